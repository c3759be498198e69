from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relayprobe.events import Outcome, ProbeFinished, Summary
from relayprobe.render import json_result
from relayprobe.store import (
    DATABASE_NAME,
    SCHEMA_VERSION,
    HistoryEntry,
    HistorySchemaError,
    HistoryStore,
    HistoryWriter,
    format_entry,
    format_table,
)

NOW = datetime.datetime(2026, 11, 29, 18, 0, tzinfo=datetime.UTC)
DEADLINE_S = 10.0
NOBODY = 65534


def make_result(
    *,
    target: str = "192.0.2.4",
    started_at: datetime.datetime = NOW,
    verdict: str = "rejected",
    accepted: int = 0,
    transcript_lines: int = 3,
) -> dict[str, Any]:
    return {
        "target": target,
        "host": "mail.example.com",
        "banner": "220 mail.example.com ESMTP",
        "started_at": started_at.isoformat(),
        "duration_s": 0.4,
        "verdict": verdict,
        "accepted": accepted,
        "relayed": 0,
        "deferred": 20 - accepted,
        "rejected": 0,
        "errors": 0,
        "summary": ["No relays accepted."],
        "probes": [],
        "transcript": [f"<<< 250 line {number}" for number in range(transcript_lines)],
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(tmp_path / "state") as opened:
        yield opened


def wait_until(condition: Any, *, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# HistoryStore


def test_round_trip_of_a_rendered_result(store: HistoryStore) -> None:
    probe = ProbeFinished("1", "<a@example.org>", "<b@example.net>", Outcome.ACCEPTED, "250 ok")
    summary = Summary(
        target="192.0.2.4",
        host="mail.example.com",
        banner="220 hello",
        verdict="accepted",
        lines=("Accepted 1 of 1.",),
        probes=(probe,),
        started_at=NOW.timestamp(),
        duration_s=1.25,
    )
    result = json_result(summary, ["Connecting to 192.0.2.4 ...", "<<< 220 hello"])

    entry_id = store.save(result)

    expected = HistoryEntry(entry_id, NOW, "192.0.2.4", "accepted", 1, 1.25, result)
    assert store.get(entry_id) == expected
    assert store.recent(limit=10) == [expected]
    assert store.get(entry_id + 1) is None


def test_recent_is_newest_first_and_limited(store: HistoryStore) -> None:
    ids = [store.save(make_result(accepted=number)) for number in range(5)]

    assert [entry.id for entry in store.recent(limit=3)] == ids[::-1][:3]
    assert [entry.accepted for entry in store.recent(limit=100)] == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="limit"):
        store.recent(limit=0)


def test_recent_filters_by_normalised_address(store: HistoryStore) -> None:
    v6_first = store.save(make_result(target="2001:db8::4"))
    store.save(make_result(target="192.0.2.4"))
    v6_second = store.save(make_result(target="2001:DB8:0:0::4"))
    store.save(make_result(target="2001:db8::5"))

    found = store.recent(address="2001:DB8::4", limit=10)

    assert [entry.id for entry in found] == [v6_second, v6_first]
    assert {entry.target for entry in found} == {"2001:db8::4"}
    assert [entry.target for entry in store.recent(address="192.0.2.4", limit=10)] == ["192.0.2.4"]
    assert store.recent(address="198.51.100.1", limit=10) == []


def test_recent_refuses_what_is_not_an_address(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        store.recent(address="mail.example.com", limit=10)


def test_results_survive_close_and_reopen(tmp_path: Path) -> None:
    with HistoryStore(tmp_path) as first:
        entry_id = first.save(make_result(verdict="relayed", accepted=2))
        saved = first.get(entry_id)

    with HistoryStore(tmp_path) as second:
        assert second.get(entry_id) == saved
        assert second.save(make_result()) == entry_id + 1


def test_prune_removes_what_is_older_than_the_retention(store: HistoryStore) -> None:
    old = store.save(make_result(started_at=NOW - datetime.timedelta(days=91)))
    # 89 days and 23 hours before NOW, written with another UTC offset: must be kept.
    offset = datetime.timezone(datetime.timedelta(hours=2))
    kept_offset = store.save(
        make_result(started_at=(NOW - datetime.timedelta(days=89, hours=23)).astimezone(offset))
    )
    kept_new = store.save(make_result(started_at=NOW))

    assert store.prune(older_than_days=90, now=NOW) == 1
    assert store.get(old) is None
    assert [entry.id for entry in store.recent(limit=10)] == [kept_new, kept_offset]
    assert store.prune(older_than_days=90, now=NOW) == 0


def test_ids_are_not_reused_after_a_prune(store: HistoryStore) -> None:
    store.save(make_result(started_at=NOW - datetime.timedelta(days=100)))
    newest = store.save(make_result(started_at=NOW - datetime.timedelta(days=100)))
    store.prune(older_than_days=90, now=NOW)

    assert store.save(make_result()) == newest + 1


def test_prune_needs_an_aware_time(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="time zone"):
        store.prune(older_than_days=1, now=datetime.datetime(2026, 1, 1))


def test_schema_version_wal_and_private_directory(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    HistoryStore(state_dir).close()

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    connection = sqlite3.connect(state_dir / DATABASE_NAME)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        index_columns = connection.execute("PRAGMA index_info(results_target_id)").fetchall()
        assert [column[2] for column in index_columns] == ["target", "id"]
    finally:
        connection.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    HistoryStore(tmp_path).close()
    connection = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    connection.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    connection.close()

    with pytest.raises(HistorySchemaError, match="newer"):
        HistoryStore(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target", "mail.example.com", "does not appear to be"),
        ("target", None, "target"),
        ("verdict", 3, "verdict"),
        ("accepted", True, "accepted"),
        ("errors", -1, "errors"),
        ("duration_s", "0.4", "duration_s"),
        ("started_at", "yesterday", "isoformat"),
        ("started_at", "2026-11-29T18:00:00", "time zone"),
        ("summary", object(), "not JSON"),
        ("duration_s", float("nan"), "not JSON"),
    ],
)
def test_save_refuses_a_malformed_result(
    store: HistoryStore, field: str, value: object, message: str
) -> None:
    result = make_result()
    result[field] = value

    with pytest.raises(ValueError, match=message):
        store.save(result)
    assert store.recent(limit=10) == []


# HistoryWriter


@pytest.fixture(autouse=True)
def no_writer_thread_left() -> Iterator[None]:
    """An abandoned writer thread ends soon after its test, before it can log into the next."""
    yield
    wait_until(lambda: all(t.name != "relayprobe-history" for t in threading.enumerate()))


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def stored(state_dir: Path) -> list[HistoryEntry]:
    with HistoryStore(state_dir) as store:
        return store.recent(limit=1000)


async def test_writer_saves_what_is_submitted(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.stop()

    assert [entry.accepted for entry in stored(tmp_path)] == [2, 1, 0]
    assert [entry["log_level"] for entry in logs] == ["debug"] * 3


async def test_writer_drops_and_logs_when_the_queue_is_full(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path, queue_size=2)
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.start()
    await writer.stop()

    assert [entry.accepted for entry in stored(tmp_path)] == [1, 0]
    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "warning",
            "reason": "queue full",
            "target": "192.0.2.4",
        }
    ]


async def test_writer_drops_and_logs_after_stop(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    await writer.stop()
    writer.submit(make_result())

    assert stored(tmp_path) == []
    assert [entry["reason"] for entry in events(logs, "history.dropped")] == ["writer stopped"]


async def test_stop_without_start_logs_what_is_dropped(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path / "state")
    writer.submit(make_result())
    await writer.stop()

    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "error",
            "reason": "writer not started",
            "count": 1,
        }
    ]
    assert not (tmp_path / "state").exists()


async def test_writer_logs_a_malformed_result_and_goes_on(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    writer.submit(make_result(target="not an address"))
    writer.submit(make_result())
    await writer.stop()

    assert len(stored(tmp_path)) == 1
    [failure] = events(logs, "history.save_failed")
    assert failure["target"] == "not an address"
    assert "does not appear to be" in failure["error"]


async def test_writer_prunes_at_start_and_then_periodically(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    with HistoryStore(tmp_path) as store:
        store.save(make_result(started_at=long_ago))
    writer = HistoryWriter(state_dir=tmp_path, retention_days=30, prune_interval_s=0.05)
    await writer.start()
    try:
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.pruned")) == 1)
        writer.submit(make_result(started_at=long_ago))
        writer.submit(make_result())
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.pruned")) == 2)
    finally:
        await writer.stop()

    assert [entry.started_at for entry in stored(tmp_path)] == [
        datetime.datetime.fromisoformat(make_result()["started_at"])
    ]


@pytest.fixture
async def loop_lag() -> AsyncIterator[list[float]]:
    """The worst lateness of a 1 ms ticker on the event loop while the test runs."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst[0] = max(worst[0], time.perf_counter() - before - 0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    yield worst
    ticker.cancel()


async def test_locked_database_is_logged_without_blocking_the_loop(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], loop_lag: list[float]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer = HistoryWriter(state_dir=tmp_path, busy_timeout_s=0.2)
    await writer.start()
    try:
        started = time.perf_counter()
        for accepted in range(3):
            writer.submit(make_result(accepted=accepted))
        submitting_s = time.perf_counter() - started
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.save_failed")) == 3)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    writer.submit(make_result(accepted=7))
    await writer.stop()

    assert submitting_s < 0.01
    assert loop_lag[0] < 0.05
    assert [entry.accepted for entry in stored(tmp_path)] == [7]
    failures = events(logs, "history.save_failed")
    assert {failure["error"] for failure in failures} == {"database is locked"}
    assert {failure["log_level"] for failure in failures} == {"error"}
    assert events(logs, "history.prune_failed")[0]["error"] == "database is locked"


async def test_stop_gives_up_after_its_timeout(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer = HistoryWriter(state_dir=tmp_path, busy_timeout_s=0.2, stop_timeout_s=0.3)
    try:
        for _ in range(20):
            writer.submit(make_result())
        await writer.start()
        started = time.perf_counter()
        await writer.stop()
        stopping_s = time.perf_counter() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert stopping_s < 1.0
    [timeout] = events(logs, "history.stop_timeout")
    assert 0 < timeout["unsaved"] < 20


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Root writes anywhere: as root, act as `nobody` for a while (all threads, by glibc)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    # Not under tmp_path: its parents are private to root, and `nobody` must reach this one.
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o700)


@pytest.mark.parametrize(
    ("subdirectory", "error"),
    [("", "unable to open database file"), ("state", "Permission denied")],
)
async def test_read_only_state_dir_fails_the_start(
    read_only_dir: Path, subdirectory: str, error: str
) -> None:
    writer = HistoryWriter(state_dir=read_only_dir / subdirectory)
    # Imports the executor's module now: `nobody` may not read the interpreter's files.
    await asyncio.to_thread(int)
    with unprivileged(), pytest.raises((sqlite3.Error, OSError), match=error):
        await writer.start()

    assert list(read_only_dir.iterdir()) == []


async def test_read_only_database_fails_the_start(read_only_dir: Path) -> None:
    # Where the directory may be written but the database may not (restored from a backup as
    # root, say), SQLite opens it read-only without a word: only a write tells.
    read_only_dir.chmod(0o777)
    HistoryStore(read_only_dir).close()
    (read_only_dir / DATABASE_NAME).chmod(0o444)
    writer = HistoryWriter(state_dir=read_only_dir)
    await asyncio.to_thread(int)
    with unprivileged(), pytest.raises(sqlite3.OperationalError, match="readonly database"):
        await writer.start()


async def test_state_dir_under_a_file_fails_the_start_even_for_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    writer = HistoryWriter(state_dir=tmp_path / "file" / "state")
    with pytest.raises(NotADirectoryError):
        await writer.start()


LOOPING_WRITER = """
import json, sys, time
from relayprobe.store import HistoryStore

store = HistoryStore(sys.argv[1])
result = json.loads(sys.argv[2])
deadline = time.monotonic() + 10
for count in range(50_000):
    if time.monotonic() > deadline:
        break
    store.save(result)
    if count == 10:
        print("writing", flush=True)
"""


def test_sigkill_while_writing_leaves_a_readable_database(tmp_path: Path) -> None:
    result = json.dumps(make_result(transcript_lines=40))
    at_least = 0
    for kill_after_s in (0.0, 0.02, 0.1):
        writer = subprocess.Popen(
            [sys.executable, "-c", LOOPING_WRITER, str(tmp_path), result],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == "writing\n"
            time.sleep(kill_after_s)
        finally:
            writer.kill()
            writer.wait(timeout=DEADLINE_S)
        assert writer.returncode == -9

        # The 11 saves before "writing" were committed before the kill.
        at_least += 11
        with HistoryStore(tmp_path) as store:
            entries = store.recent(limit=at_least)
            assert len(entries) == at_least
            assert entries[0].result == json.loads(result)
        connection = sqlite3.connect(tmp_path / DATABASE_NAME)
        try:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            at_least = connection.execute("SELECT count(*) FROM results").fetchone()[0]
        finally:
            connection.close()


# Formatting


def make_entry(entry_id: int, **changes: Any) -> HistoryEntry:
    result = make_result(**changes)
    return HistoryEntry(
        id=entry_id,
        started_at=datetime.datetime.fromisoformat(result["started_at"]),
        target=result["target"],
        verdict=result["verdict"],
        accepted=result["accepted"],
        duration_s=result["duration_s"],
        result=result,
    )


def test_format_table_aligns_columns() -> None:
    entries = [
        make_entry(12, target="2001:db8::4", verdict="accepted", accepted=12),
        make_entry(9, started_at=NOW - datetime.timedelta(days=1, seconds=1)),
    ]

    assert format_table(entries) == [
        "ID  STARTED (UTC)        TARGET       VERDICT   ACCEPTED  DURATION",
        "12  2026-11-29 18:00:00  2001:db8::4  accepted        12     0.4 s",
        " 9  2026-11-28 17:59:59  192.0.2.4    rejected         0     0.4 s",
    ]
    assert format_table([]) == [
        "ID  STARTED (UTC)  TARGET  VERDICT  ACCEPTED  DURATION",
    ]


def test_format_entry_shows_a_header_then_the_transcript() -> None:
    shown = make_entry(3, transcript_lines=2)

    assert format_entry(shown) == [
        "Test #3 of 192.0.2.4 (mail.example.com)",
        "Started:  2026-11-29 18:00:00 UTC, took 0.4 s",
        "Banner:   220 mail.example.com ESMTP",
        "Verdict:  rejected (0 accepted, 0 relayed, 20 deferred, 0 rejected, 0 errors)",
        "",
        "<<< 250 line 0",
        "<<< 250 line 1",
    ]


def test_format_entry_escapes_what_a_terminal_would_act_on() -> None:
    shown = make_entry(3)
    shown.result["banner"] = "220 \x1b]0;owned\x07"
    shown.result["transcript"] = ["<<< 250 \x1b[2J"]

    lines = format_entry(shown)

    assert lines[2] == "Banner:   220 \\x1b]0;owned\\x07"
    assert lines[-1] == "<<< 250 \\x1b[2J"
