"""What an operator relies on, end to end on loopback: access lists, rate limits, metrics, history.

Each caller connects from its own loopback address (all of 127/8 is local) and a fake mail server
listens on that address, so the tests see whether the service connected back to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayprobe.app import Application
from relayprobe.fakemx import FakeMailServer
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.operations.metrics import REFUSAL_REASONS, VERDICTS
from relayprobe.operations.startup import StartupError
from relayprobe.storage.store import DATABASE_NAME, HistoryStore
from tests.infra.command import Completed, environment, relayprobe
from tests.infra.dataservers import PostgresServer
from tests.infra.haproxy import free_port

VERDICT_LINE = "System appeared to reject relay attempts"
ACCESS_LINE = "This service tests only customer networks"
TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def serving_mail(servers: Mapping[str, FakeMailServer]) -> AsyncIterator[int]:
    """Start each fake mail server on its address, all on one port; yield that port."""
    port = 0
    started: list[FakeMailServer] = []
    try:
        for address, server in servers.items():
            port = await asyncio.wait_for(server.start(address, port), TIMEOUT_S)
            started.append(server)
        yield port
    finally:
        for server in started:
            await asyncio.wait_for(server.stop(), TIMEOUT_S)


@contextlib.asynccontextmanager
async def running_app(**changes: object) -> AsyncIterator[Application]:
    """An Application on a free loopback port; no history or rate limits unless `changes` say."""
    settings = dataclasses.replace(
        Settings(),
        **{
            "listen": (Endpoint("127.0.0.1", 0),),
            "reply_timeout": 2.0,
            "history": False,
            "rate_limit": False,
            **changes,
        },  # type: ignore[arg-type]
    )
    app = Application(settings)
    await asyncio.wait_for(app.start(), TIMEOUT_S)
    try:
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), TIMEOUT_S)


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Everything a test starts, stopped in reverse order afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def call(endpoint: Endpoint, *, source: str, send: bytes = b"") -> list[str]:
    """Connect from `source`, send `send`, and read the service's lines until it hangs up."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(source, 0)), TIMEOUT_S
    )
    try:
        writer.write(send)
        data = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()
    return data.decode().split("\r\n")


def metric(exposition: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition; KeyError if it is not there."""
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    return samples[name, frozenset(labels.items())]


def probes_received(server: FakeMailServer) -> int:
    """How many relay probes reached `server`: each probe is one RCPT."""
    return sum(1 for command in server.commands if command.startswith(b"RCPT TO:"))


def suite_size(app: Application) -> int:
    return len(app.core.options.suite)


def exposition(app: Application) -> str:
    body, _ = app.metrics.exposition()
    return body.decode()


def refusal_counts(text: str) -> dict[str, float]:
    return {
        reason: metric(text, "relayprobe_refusals_total", reason=reason)
        for reason in REFUSAL_REASONS
    }


# Access lists


@pytest.mark.parametrize(
    ("allow", "deny", "outsider", "customer"),
    [
        (("127.0.20.0/24",), (), "127.0.21.1", "127.0.20.1"),
        (("127.0.22.0/24",), ("127.0.22.128/25",), "127.0.22.200", "127.0.22.1"),
        ((), ("127.0.23.0/24",), "127.0.23.1", "127.0.24.1"),
    ],
    ids=["outside-allow", "deny-wins-over-allow", "deny-only"],
)
async def test_caller_not_permitted_gets_one_line_and_nothing_connects_out(
    stack: contextlib.AsyncExitStack,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    outsider: str,
    customer: str,
) -> None:
    servers = {outsider: FakeMailServer(), customer: FakeMailServer()}
    port = await stack.enter_async_context(serving_mail(servers))
    app = await stack.enter_async_context(running_app(target_port=port, allow=allow, deny=deny))
    endpoint = app.listening[0]

    assert await call(endpoint, source=outsider) == [ACCESS_LINE, ""]
    assert VERDICT_LINE in await call(endpoint, source=customer)

    assert servers[outsider].sessions == 0
    assert probes_received(servers[customer]) == suite_size(app)
    assert refusal_counts(exposition(app))["access"] == 1


# Rate limits


@dataclass(frozen=True, slots=True)
class Refused:
    """A call the rate limits refuse: its line's pattern, the longest wait named, the label."""

    pattern: str
    longest_wait_s: int
    reason: str


TESTED = None
BY_ADDRESS = Refused(r"Too many tests from your address; try again in (\d+) s", 60, "rate_address")
BY_PREFIX = Refused(r"Too many tests from your network; try again in (\d+) s", 60, "rate_prefix")
BY_EVERYONE = Refused(r"Too many tests from everyone; try again in (\d+) s", 20, "rate_global")
# Loose unless a case tightens one: the per-address interval of 60 s always applies.
LOOSE_LIMITS = {
    "rate_limit": True,
    "rate_address_interval": 60.0,
    "rate_prefix_tests": 100,
    "rate_prefix_window": 60.0,
    "rate_global": 1000.0,
}


@pytest.mark.parametrize(
    ("changes", "calls"),
    [
        (
            {},
            [("127.0.30.1", TESTED), ("127.0.30.1", BY_ADDRESS), ("127.0.30.2", TESTED)],
        ),
        (
            {"rate_prefix_tests": 2},
            [
                ("127.0.31.1", TESTED),
                ("127.0.31.2", TESTED),
                ("127.0.31.3", BY_PREFIX),
                ("127.0.32.1", TESTED),
            ],
        ),
        # A burst of one token refilled at 0.05 per second: the next test waits 20 s.
        ({"rate_global": 0.05}, [("127.0.33.1", TESTED), ("127.0.34.1", BY_EVERYONE)]),
        # Every limit tight, and the limits off.
        (
            {"rate_prefix_tests": 1, "rate_global": 0.05, "rate_limit": False},
            [("127.0.35.1", TESTED)] * 3,
        ),
    ],
    ids=["per-address", "per-prefix", "global", "off"],
)
async def test_rate_limits_refuse_with_a_retry_time_and_nothing_connects_out(
    stack: contextlib.AsyncExitStack,
    changes: dict[str, object],
    calls: list[tuple[str, Refused | None]],
) -> None:
    servers = {source: FakeMailServer() for source, _ in calls}
    port = await stack.enter_async_context(serving_mail(servers))
    app = await stack.enter_async_context(
        running_app(target_port=port, **{**LOOSE_LIMITS, **changes})
    )

    for source, refused in calls:
        lines = await call(app.listening[0], source=source)
        if refused is None:
            assert VERDICT_LINE in lines, (source, lines)
            continue
        assert len(lines) == 2 and lines[1] == "", lines
        match = re.fullmatch(refused.pattern, lines[0])
        assert match is not None, lines
        assert 1 <= int(match[1]) <= refused.longest_wait_s

    for source, server in servers.items():
        tests = sum(1 for caller, refused in calls if caller == source and refused is None)
        assert probes_received(server) == tests * suite_size(app)
        assert (server.sessions > 0) == (tests > 0)
    expected = {reason: 0.0 for reason in REFUSAL_REASONS}
    for _, refused in calls:
        if refused is not None:
            expected[refused.reason] += 1
    assert refusal_counts(exposition(app)) == expected


# Metrics over HTTP


async def http_get(endpoint: Endpoint, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port), TIMEOUT_S
    )
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def test_metrics_over_http_count_tests_probes_refusals_and_sessions(
    stack: contextlib.AsyncExitStack,
) -> None:
    first, second, outsider = "127.0.50.1", "127.0.50.2", "127.0.51.1"
    servers = {
        # Slow enough (about 60 replies) to scrape while the first test runs.
        first: FakeMailServer(reply_delay=0.02),
        second: FakeMailServer(),
        outsider: FakeMailServer(),
    }
    port = await stack.enter_async_context(serving_mail(servers))
    app = await stack.enter_async_context(
        running_app(
            target_port=port,
            http_listen=Endpoint("127.0.0.1", 0),
            deny=("127.0.51.0/24",),
            **LOOSE_LIMITS,
        )
    )
    assert app.http_address is not None
    endpoint, http = app.listening[0], app.http_address
    assert await http_get(http, "/readyz") == (200, "ready")

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(first, 0)), TIMEOUT_S
    )
    await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 1\r\n"), TIMEOUT_S)
    status, running = await http_get(http, "/metrics")
    assert status == 200
    assert metric(running, "relayprobe_active_sessions") == 1
    rest = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()
    assert f"\r\n{VERDICT_LINE}\r\n".encode() in rest

    assert (await call(endpoint, source=first))[0].startswith("Too many tests from your address")
    assert await call(endpoint, source=outsider) == [ACCESS_LINE, ""]
    assert VERDICT_LINE in await call(endpoint, source=second)

    status, text = await http_get(http, "/metrics")
    assert status == 200
    probes = suite_size(app)
    assert metric(text, "relayprobe_tests_started_total") == 2
    assert {
        verdict: metric(text, "relayprobe_tests_finished_total", verdict=verdict)
        for verdict in VERDICTS
    } == {"rejected": 2, "accepted": 0, "relayed": 0, "incomplete": 0}
    assert metric(text, "relayprobe_probe_outcomes_total", outcome="rejected") == 2 * probes
    assert metric(text, "relayprobe_probe_outcomes_total", outcome="accepted") == 0
    assert refusal_counts(text) == {
        reason: float(reason in {"rate_address", "access"}) for reason in REFUSAL_REASONS
    }
    assert metric(text, "relayprobe_active_sessions") == 0
    assert metric(text, "relayprobe_session_duration_seconds_count") == 2
    assert await http_get(http, "/readyz") == (200, "ready")


# History


def listed_targets(listing: str) -> list[str]:
    """The TARGET column of a `relayprobe history` table, top to bottom."""
    heading, *rows = listing.splitlines()
    assert heading.split()[:2] == ["ID", "STARTED"]
    # ID, date, time, TARGET, ...
    return [row.split()[3] for row in rows]


FIRST, SECOND = "127.0.40.1", "127.0.40.2"


@pytest.fixture
async def history_dir(tmp_path: Path, stack: contextlib.AsyncExitStack) -> Path:
    """A state directory holding two finished tests, FIRST then SECOND; the service stopped."""
    servers = {FIRST: FakeMailServer(), SECOND: FakeMailServer()}
    port = await stack.enter_async_context(serving_mail(servers))
    async with running_app(target_port=port, history=True, state_dir=str(tmp_path)) as app:
        for source in (FIRST, SECOND):
            assert VERDICT_LINE in await call(app.listening[0], source=source)
    return tmp_path


async def test_history_lists_stored_tests_newest_first(history_dir: Path) -> None:
    listing = await relayprobe("history", "--state-dir", str(history_dir))
    assert listing.returncode == 0, listing.stderr
    assert listed_targets(listing.stdout) == [SECOND, FIRST]
    assert all(" rejected " in row for row in listing.stdout.splitlines()[1:])


async def test_history_filters_by_address(history_dir: Path) -> None:
    listing = await relayprobe("history", FIRST, "--state-dir", str(history_dir))
    assert listing.returncode == 0, listing.stderr
    assert listed_targets(listing.stdout) == [FIRST]


@pytest.mark.parametrize("named_by", ["row number", "public ID"])
async def test_history_shows_the_stored_transcript(history_dir: Path, named_by: str) -> None:
    with HistoryStore(history_dir) as store:
        (entry,) = store.recent(address=FIRST)
    name = str(entry.id) if named_by == "row number" else entry.public_id
    shown = await relayprobe("history", "--show", name, "--state-dir", str(history_dir))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"Test #{entry.id} of {FIRST} (")
    assert lines[1] == f"Public ID: {entry.public_id}"
    assert f"Connecting to {FIRST} ..." in lines
    assert "<<< 554 5.7.1 Relay access denied" in lines
    assert VERDICT_LINE in lines


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("99", "99"),
        ("9" * 30, "9" * 30),
        ("kG2uNb8yq0pBkV3aS1-_xA", "kG2uNb8yq0pBkV3aS1-_xA"),
        ("not-an-id\x1b[2J", "not-an-id\\x1b[2J"),
    ],
)
async def test_history_show_of_an_unknown_result_says_so_in_one_line(
    history_dir: Path, name: str, said: str
) -> None:
    shown = await relayprobe("history", "--show", name, "--state-dir", str(history_dir))
    assert one_line_of_error(shown) == f"relayprobe history: no result with ID {said}"


async def test_history_json_parses(history_dir: Path) -> None:
    dumped = await relayprobe("history", "--json", "--state-dir", str(history_dir))
    assert dumped.returncode == 0, dumped.stderr
    results = json.loads(dumped.stdout)
    assert [result["target"] for result in results] == [SECOND, FIRST]
    for result in results:
        assert result["verdict"] == "rejected"
        assert result["transcript"][0] == f"Connecting to {result['target']} ..."


async def test_history_survives_a_restart(
    history_dir: Path, stack: contextlib.AsyncExitStack
) -> None:
    third = "127.0.40.3"
    port = await stack.enter_async_context(serving_mail({third: FakeMailServer()}))
    async with running_app(target_port=port, history=True, state_dir=str(history_dir)) as app:
        with HistoryStore(history_dir) as store:
            assert [entry.target for entry in store.recent()] == [SECOND, FIRST]
        assert VERDICT_LINE in await call(app.listening[0], source=third)
    with HistoryStore(history_dir) as store:
        entries = store.recent()
    assert [entry.target for entry in entries] == [third, SECOND, FIRST]
    assert entries[0].id > entries[1].id > entries[2].id


async def wait_listening(process: asyncio.subprocess.Process, log: Path) -> None:
    """Wait until a `relayprobe serve --log-format json` process logs that it listens."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.returncode is None, log.read_text()
        events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
        if "listening" in events:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the service did not start listening: {log.read_text()}")


async def saved(state_dir: Path, target: str) -> None:
    """Wait until the service's history holds a result for `target`."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with HistoryStore(state_dir) as store:
            if store.recent(address=target):
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no result for {target} in the history")


async def test_history_is_readable_after_the_service_is_killed_mid_test(
    tmp_path: Path, stack: contextlib.AsyncExitStack
) -> None:
    finished, running = "127.0.41.1", "127.0.41.2"
    servers = {finished: FakeMailServer(), running: FakeMailServer(reply_delay=0.2)}
    port = await stack.enter_async_context(serving_mail(servers))
    state_dir, log = tmp_path / "state", tmp_path / "serve.log"
    endpoint = Endpoint("127.0.0.1", free_port("127.0.0.1"))
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayprobe",
            "serve",
            "--listen",
            str(endpoint),
            "--target-port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--no-rate-limit",
            "--log-format",
            "json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=environment(),
        )
    try:
        await wait_listening(process, log)
        assert VERDICT_LINE in await call(endpoint, source=finished)
        await saved(state_dir, finished)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(running, 0)),
            TIMEOUT_S,
        )
        await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 1\r\n"), TIMEOUT_S)
        process.kill()
        await asyncio.wait_for(process.wait(), TIMEOUT_S)
        writer.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Killed, the writer never closed the database: its last commits are still in the WAL.
    assert (state_dir / "history.sqlite3-wal").exists()

    listing = await relayprobe("history", "--state-dir", str(state_dir))
    assert listing.returncode == 0, listing.stderr
    assert listed_targets(listing.stdout) == [finished]
    dumped = await relayprobe("history", "--json", "--state-dir", str(state_dir))
    assert dumped.returncode == 0, dumped.stderr
    assert [result["target"] for result in json.loads(dumped.stdout)] == [finished]


async def test_an_unwritable_state_dir_fails_the_start_unless_history_is_off(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    state_dir = str(tmp_path / "file" / "state")
    with pytest.raises(StartupError) as raised:
        async with running_app(history=True, state_dir=state_dir):
            pytest.fail("the service started without a usable history")
    assert raised.value.strerror.startswith(f"history: cannot write in {state_dir}: ")
    async with running_app(history=False, state_dir=state_dir) as app:
        assert app.ready().ready


def one_line_of_error(completed: Completed) -> str:
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    [line] = completed.stderr.splitlines()
    return line


async def test_serve_with_an_unwritable_state_dir_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"
    listen = str(Endpoint("127.0.0.1", free_port("127.0.0.1")))
    served = await relayprobe("serve", "--listen", listen, "--state-dir", str(state_dir))
    assert one_line_of_error(served) == (
        f"relayprobe serve: history: cannot write in {state_dir}: Not a directory; give"
        " --state-dir a directory the service may write, or --no-history"
    )


async def test_serve_with_a_database_that_refuses_it_says_so_in_one_line(
    postgres: PostgresServer,
) -> None:
    """A wrong database (or user, or password) is the operator's mistake, not an outage: the
    service stops at once instead of running degraded for ever."""
    url = postgres.url.rsplit("/", 1)[0] + "/nosuchdb"
    listen = str(Endpoint("127.0.0.1", free_port("127.0.0.1")))
    served = await relayprobe("serve", "--listen", listen, "--database-url", url)
    line = one_line_of_error(served)
    assert line.startswith(
        f"relayprobe serve: history: cannot write in PostgreSQL database nosuchdb on "
        f"127.0.0.1:{postgres.port}: "
    )
    assert 'database "nosuchdb" does not exist' in line
    assert line.endswith(
        "; check --database-url and that the database accepts this user, or --no-history"
    )


@pytest.mark.parametrize("layout", ["under a file", "database is a directory", "not a database"])
async def test_history_of_a_bad_state_dir_says_so_in_one_line(tmp_path: Path, layout: str) -> None:
    state_dir = tmp_path
    if layout == "under a file":
        (tmp_path / "file").write_text("")
        state_dir = tmp_path / "file" / "state"
    elif layout == "database is a directory":
        (tmp_path / DATABASE_NAME).mkdir()
    else:
        (tmp_path / DATABASE_NAME).write_text("not SQLite\n" * 100)
    listing = await relayprobe("history", "--state-dir", str(state_dir))
    assert one_line_of_error(listing).startswith("relayprobe history: ")
