"""Load the telnet reflector with N callers at once, each from its own loopback address.

Every caller connects from its own 127.77.x.y to a `relayprobe serve` process, which connects
back to that address's SMTP port. There a fake mail server that relays nothing answers at once:
one listener per caller address, all in a second process, so nothing listens on 0.0.0.0. A
caller reads until the service hangs up and checks that the transcript ends with a verdict
("System appeared to ..."). Each run gets fresh processes, so the service's peak RSS (VmHWM) is
that run's alone.

Per run the table shows the sessions that ended with a verdict, failures by kind, the wall time
from the first connect to the last hang-up, sessions/s (verdicts over that wall time), p50/p99
session time (connect to hang-up), the service's idle and peak RSS, and the CPU seconds of the
service, the fake mail server, the callers and everything else on the machine (kernel work and
other processes: a busy machine explains a slow run); then the service's CPU per test, and its
CPU over the fake mail server's (`/fake`: the same conversations seen from the other end).

With the telnet door every repeat also runs a yardstick, in alternating order with relayprobe:
`benchmarks.bare_reflector`, a bare-bones asyncio reflector (one SMTP session per test, no
timeouts, limits or sanitising), served by the same callers and fake; then the ratio of
relayprobe to the yardstick, for sessions/s, p99 and service CPU per test. Issue 13's targets at
1,000 callers: at least 0.8x the yardstick's sessions/s, and service CPU at most 1.8x the fake's.
`--same-sessions` makes the yardstick open a fresh SMTP session where relayprobe's error budget
does (three a test against the fake, instead of one), so that both hold the same conversation.
`--trial NAME` runs, instead of relayprobe, relayprobe with a part of its work taken away
(`benchmarks.trials`: no transcript, one SMTP session a test, or neither), to measure what that
part costs against the same yardstick. `--yardsticks` runs no relayprobe at all: the yardstick
holding the same sessions against the one-session yardstick, which is what the spec's fresh
sessions cost an implementation that does nothing else.

With `--door http` the callers are curl-style HTTP clients of the web front door instead
(`GET /`, `Accept: */*`, reading the streamed transcript until the service closes), and there is
no yardstick.

With `--replicas R` (2 to 4) every repeat runs two configurations in turn, in alternating order:
one service with its state in memory, and R services sharing a throwaway redis-server on
loopback (`--redis-url`); the callers are spread evenly over the replicas (caller i to replica
i mod R). Both run with rate limits on, set high enough to admit every caller, and with
delivery confirmation on (a canary sink per replica), so that admissions and the token registry
do what they do in service. The fake mail server relays nothing, so each test registers a token
per probe and forgets them, and nothing arrives; `--relay` makes it an open relay that delivers
every test message to a canary sink (replica i+1's, for a caller of replica i), so that the
registry's arrival path is measured too. Per run the table adds each replica's peak RSS and CPU,
redis-server's CPU, the Redis round trips per test (requests Redis read from its clients, from
`INFO stats` total_reads_processed) and commands per test (`INFO commandstats`, which counts the
commands inside MULTI/EXEC and inside scripts too), the services' fallback and failure counters
(from their /metrics) and how delivery confirmation ended; then the ratio of the R-replica
configuration to the one-replica one, for sessions/s and p99. `--redis-timeout S` passes the
replicas a bound on each Redis call other than the service's default.

Run from the repository root:

    python -m benchmarks.load [--door telnet|http] [--sessions 100 1000] [--repeat R]
                              [--trial NAME | --same-sessions | --yardsticks]
                              [--replicas R [--relay] [--redis-timeout S]] [--timeout S] [--json]

(`python -m benchmarks.load fake --count N` is the fake mail server process it starts.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks.trials import TRIALS
from relayprobe.fakemx import FakeMailServer, relays_everything, relays_nothing
from relayprobe.frontdoors.core import BUSY
from relayprobe.operations import runtime
from tests.infra.dataservers import redis_available, running_redis

REPOSITORY = Path(__file__).resolve().parents[1]
FAKE_COMMAND = "fake"
MAX_SESSIONS = 2000  # the service runs with --max-sessions 2000
MAX_REPEAT = 10
RUN_TIMEOUT_S = 120.0
MAX_RUN_TIMEOUT_S = 600.0
# Targets of the issue, for a 2-core machine.
TARGET_SESSIONS_PER_S = 200.0
TARGET_PEAK_RSS_MB = 200.0

VERDICT_PREFIX = "System appeared to "
INCOMPLETE_PREFIX = "Test incomplete"
CONFIRMATION_MARKERS = (
    ("delivery confirmation unavailable", "unavailable"),
    ("Relay not confirmed:", "not confirmed"),
    ("Relay confirmed:", "confirmed"),
)
# The verdict is in the last lines; the whole transcript is not kept.
TAIL_BYTES = 4096
READ_CHUNK = 64 * 1024

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
STARTUP_POLL_S = 0.05
# The fake stops by itself when its parent closes its stdin, or after this long at most.
FAKE_LIFETIME_S = 2 * MAX_RUN_TIMEOUT_S
FAKE_PORT_ATTEMPTS = 5

MAX_REPLICAS = 4
# Rate limits on, but never in the way: each caller tests once from its own address, and
# `caller_addresses` puts at most 250 callers in one /24.
ADMIT_EVERYONE = (
    "--rate-limit",
    "--rate-prefix-tests",
    str(MAX_SESSIONS),
    "--rate-global",
    "100000",
)
# With --relay all 20 test messages of a test reach a sink at once from the caller's address.
SINK_OPEN = (
    *("--sink-max-connections", str(MAX_SESSIONS)),
    *("--sink-max-connections-per-address", "100"),
    *("--sink-max-connections-per-prefix", str(MAX_SESSIONS)),
    *("--sink-replies-per-second", "1000000"),
    *("--sink-message-bytes-per-second", "1000000"),
)
CONFIRM_WAIT_S = 10.0
MAX_REDIS_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 5.0
# Counters of the services' /metrics summed over replicas and labels, under these names.
COUNTERS = {
    "relayprobe_rate_limit_fallbacks_total": "rate limit fallbacks",
    "relayprobe_registry_failures_total": "registry failures",
    "relayprobe_refusals_total": "refusals",
    "relayprobe_sink_deliveries_total": "sink deliveries",
}
# The benchmark's own INFO between the two snapshots of a run.
OWN_REDIS_REQUESTS = 1
TOP_COMMANDS = 8


class BenchmarkError(RuntimeError):
    """A process of the benchmark could not start."""


def caller_addresses(count: int) -> list[str]:
    """`count` distinct loopback addresses, clear of the 127.0.0.x that tests and Postfix use."""
    return [f"127.77.{index // 250}.{index % 250 + 1}" for index in range(count)]


def raise_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: 1,000 sessions need over 2,000."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# The fake mail server process


class _EndWatcher(asyncio.Protocol):
    def __init__(self, ended: asyncio.Future[None]) -> None:
        self.ended = ended

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.connect_read_pipe(lambda: _EndWatcher(ended), sys.stdin)
    try:
        await ended
    finally:
        transport.close()


async def _start_fakes(
    addresses: Sequence[str], forward_ports: Sequence[int]
) -> tuple[int, list[FakeMailServer]]:
    """One fake per address, all on one port (the first free one on the first address). With
    `forward_ports` each relays everything and delivers to 127.0.0.1 at the port of its index
    modulo their number; without, it relays nothing."""
    for _ in range(FAKE_PORT_ATTEMPTS):
        servers: list[FakeMailServer] = []
        port = 0
        try:
            for index, address in enumerate(addresses):
                server = (
                    FakeMailServer(
                        relay=relays_everything,
                        forward_to=("127.0.0.1", forward_ports[index % len(forward_ports)]),
                    )
                    if forward_ports
                    else FakeMailServer(relay=relays_nothing)
                )
                servers.append(server)
                port = await server.start(address, port)
        except OSError as exc:
            await asyncio.gather(*(server.stop() for server in servers))
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return port, servers
    raise BenchmarkError(f"no port free on all {len(addresses)} addresses")


async def _serve_fakes(count: int, forward_ports: Sequence[int]) -> None:
    port, servers = await _start_fakes(caller_addresses(count), forward_ports)
    print(port, flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_stdin_closed(), FAKE_LIFETIME_S)
    await asyncio.gather(*(server.stop() for server in servers))


def fake_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.load fake")
    parser.add_argument("--count", type=int, required=True, help="caller addresses to serve")
    parser.add_argument(
        "--forward-to",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="relay everything and deliver to 127.0.0.1:PORT (repeatable: by address, in turn)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_SESSIONS:
        parser.error(f"--count must be between 1 and {MAX_SESSIONS}")
    raise_file_limit()
    runtime.run(_serve_fakes(args.count, args.forward_to))
    return 0


# Processes seen from outside


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status, such as VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    # After the command name: state is field 3 of proc(5), utime 14 and stime 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores have spent on anything but idling, so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _, _, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[str]) -> None:
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def fake_mail_process(
    count: int, forward_ports: Sequence[int] = ()
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The fake mail server process for `count` callers, and the port it listens on; with
    `forward_ports`, an open relay delivering to them (see `_start_fakes`)."""
    forwarding = [argument for port in forward_ports for argument in ("--forward-to", str(port))]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load", FAKE_COMMAND, "--count", str(count), *forwarding],
        cwd=REPOSITORY,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise BenchmarkError(f"the fake mail server did not start (exit {process.poll()})")
        yield process, int(line)
    finally:
        process.stdin.close()
        _stop(process)


def service_environment() -> dict[str, str]:
    """This environment without RELAYPROBE_* settings, so the options below are all it gets."""
    return {name: value for name, value in os.environ.items() if not name.startswith("RELAYPROBE_")}


def wait_until_listening(process: subprocess.Popen[str], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        if '"event": "listening"' in log:
            return
        if process.poll() is not None:
            last = log.strip().splitlines()[-1:] or ["no output"]
            raise BenchmarkError(f"the service exited {process.returncode}: {last[0]}")
        time.sleep(STARTUP_POLL_S)
    raise BenchmarkError(f"the service did not listen within {STARTUP_TIMEOUT_S:g} s")


@dataclass(frozen=True, slots=True)
class Setup:
    """The services of one run. `stateful`: rate limits on (admitting everyone) and delivery
    confirmation on, each replica with a sink; otherwise both off, as in the plain benchmark.
    `yardstick`: `benchmarks.bare_reflector` instead of relayprobe."""

    yardstick: bool = False
    replicas: int = 1
    redis: bool = False
    stateful: bool = False
    relay: bool = False
    redis_timeout: float | None = None  # None: the service's default
    trial: str | None = None
    """A `benchmarks.trials` name: relayprobe with that part of its work taken away."""
    same_sessions: bool = False
    """For the yardstick: a fresh SMTP session where relayprobe's error budget opens one."""

    @property
    def label(self) -> str:
        """How the table names this setup."""
        if self.yardstick:
            return "reflector, same sessions" if self.same_sessions else "bare-bones reflector"
        if self.trial is not None:
            return f"trial {self.trial}"
        if not self.stateful:
            return "relayprobe"
        state = "Redis" if self.redis else "in memory"
        timeout = "" if self.redis_timeout is None else f" {self.redis_timeout:g}s"
        return f"{self.replicas} x {state}{timeout}"


@dataclass(frozen=True, slots=True)
class ReplicaPorts:
    """The 127.0.0.1 ports of one service: the callers' door, the other door, the canary sink
    and the operators' endpoint (the last two only with a stateful setup)."""

    door: int
    other_door: int
    sink: int | None = None
    http: int | None = None

    @classmethod
    def pick(cls, setup: Setup) -> ReplicaPorts:
        if not setup.stateful:
            return cls(free_port(), free_port())
        return cls(free_port(), free_port(), free_port(), free_port())


def delivery_ports(replicas: Sequence[ReplicaPorts]) -> list[int]:
    """Where the fake of caller i delivers: the sink of the replica after the one that caller
    tests through (caller i tests through replica i mod R), so that with several replicas
    every arrival crosses from one replica to another."""
    sinks = [ports.sink for ports in replicas if ports.sink is not None]
    return sinks[1:] + sinks[:1]


def service_command(
    setup: Setup, ports: ReplicaPorts, mail_port: int, door: str, redis_url: str | None
) -> list[str]:
    """The `relayprobe serve` command line of one replica, or the yardstick's."""
    if setup.yardstick:
        return [
            *(sys.executable, "-m", "benchmarks.bare_reflector"),
            *("--listen", f"127.0.0.1:{ports.door}", "--target-port", str(mail_port)),
            *(("--same-sessions",) if setup.same_sessions else ()),
        ]
    telnet, web = (
        (ports.door, ports.other_door) if door == "telnet" else (ports.other_door, ports.door)
    )
    program = ("benchmarks.trials", setup.trial) if setup.trial else ("relayprobe",)
    command = [
        *(sys.executable, "-m", *program, "serve"),
        *("--listen", f"127.0.0.1:{telnet}", "--web-listen", f"127.0.0.1:{web}"),
        *("--target-port", str(mail_port), "--max-sessions", str(MAX_SESSIONS)),
        *("--no-history", "--log-format", "json"),
    ]
    if not setup.stateful:
        return [*command, "--no-rate-limit", "--no-confirm"]
    command += [
        *ADMIT_EVERYONE,
        *("--confirm", "--sink-listen", f"127.0.0.1:{ports.sink}"),
        *("--confirm-wait", f"{CONFIRM_WAIT_S:g}", "--http-listen", f"127.0.0.1:{ports.http}"),
    ]
    if setup.relay:
        command += SINK_OPEN
    if setup.redis:
        if redis_url is None:
            raise ValueError("a Redis setup needs a redis_url")
        command += ["--redis-url", redis_url]
        if setup.redis_timeout is not None:
            command += ["--redis-timeout", f"{setup.redis_timeout:g}"]
    return command


@contextlib.contextmanager
def reflector_process(command: Sequence[str], log_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The service as `command` says, logging JSON to `log_path`, once it listens."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=service_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
    try:
        wait_until_listening(process, log_path)
        yield process
    finally:
        process.terminate()
        _stop(process)


def metric_totals(exposition: str) -> dict[str, float]:
    """The `COUNTERS` of a Prometheus text exposition: each one's total, and beside it each
    labelled sample that is not zero (`registry failures{operation="register"}`)."""
    totals = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in exposition.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, _, text = line.rpartition(" ")
        name, brace, labels = sample.partition("{")
        if name not in COUNTERS:
            continue
        value = float(text)
        totals[COUNTERS[name]] += value
        if brace and value:
            key = f"{COUNTERS[name]}{{{labels}"
            totals[key] = totals.get(key, 0.0) + value
    return totals


def scrape_counters(http_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        return metric_totals(response.read().decode("utf-8", "replace"))


# Redis seen from outside


@dataclass(frozen=True, slots=True)
class RedisCounts:
    """redis-server's counters at one moment."""

    reads: int
    """Reads from client sockets: a request, or several pipelined in one write, or a hang-up."""
    calls: Mapping[str, int]
    """Commands executed by name, those inside MULTI/EXEC and scripts too."""
    cpu_s: float

    @classmethod
    def of(cls, info: Mapping[str, object], cpu_s: float) -> RedisCounts:
        """From redis-py's parse of `INFO everything`."""
        calls = {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in info.items()
            if name.startswith("cmdstat_") and isinstance(stats, dict)
        }
        reads = info["total_reads_processed"]
        assert isinstance(reads, int)
        return cls(reads, calls, cpu_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisUse:
    """What the replicas asked of Redis during one run's callers."""

    cpu_s: float
    round_trips: int
    calls: Mapping[str, int]

    @classmethod
    def between(cls, before: RedisCounts, after: RedisCounts) -> RedisUse:
        """The difference, less the benchmark's own INFO that took the second snapshot."""
        calls = Counter(after.calls)
        calls.subtract(before.calls)
        calls["info"] -= OWN_REDIS_REQUESTS
        return cls(
            cpu_s=after.cpu_s - before.cpu_s,
            round_trips=after.reads - before.reads - OWN_REDIS_REQUESTS,
            calls={name: count for name, count in calls.most_common() if count > 0},
        )


@dataclass(frozen=True, slots=True)
class WatchedRedis:
    """A run's redis-server, and a connection of the benchmark's own to read its counters."""

    url: str
    pid: int
    client: redis.Redis

    def counts(self) -> RedisCounts:
        info = self.client.info("everything")
        assert isinstance(info, dict)
        return RedisCounts.of(info, cpu_seconds(self.pid))


@contextlib.contextmanager
def watched_redis() -> Iterator[WatchedRedis]:
    """A throwaway redis-server on 127.0.0.1 (tests.infra's), stopped after."""
    with (
        running_redis() as server,
        redis.Redis(port=server.port, socket_timeout=METRICS_TIMEOUT_S) as client,
    ):
        assert server.process is not None
        yield WatchedRedis(server.url, server.process.pid, client)


# The callers


@dataclass(frozen=True, slots=True)
class Call:
    """One caller's session, timed on the benchmark's clock."""

    started: float
    ended: float
    failure: str | None  # None: the transcript ended with a verdict
    confirmation: str | None = None  # how delivery confirmation ended, if it says so

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def transcript_failure(tail: bytes) -> str | None:
    """None when the last lines hold a verdict, else what they show instead."""
    lines = tail.decode("utf-8", "replace").splitlines()
    if any(line.startswith(VERDICT_PREFIX) for line in lines):
        return None
    if any(line.startswith(INCOMPLETE_PREFIX) for line in lines):
        return "incomplete"
    if BUSY.message in lines:
        return "busy"
    return "no verdict"


def transcript_confirmation(tail: bytes) -> str | None:
    """How the last lines say delivery confirmation ended; None when they say nothing of it."""
    text = tail.decode("utf-8", "replace")
    for marker, confirmation in CONFIRMATION_MARKERS:
        if marker in text:
            return confirmation
    return None


async def _read_tail(reader: asyncio.StreamReader) -> bytes:
    tail = b""
    while chunk := await reader.read(READ_CHUNK):
        tail = (tail + chunk)[-TAIL_BYTES:]
    return tail


# What curl sends for `curl -N http://HOST:PORT/`.
HTTP_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: relay-test.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)


async def call(service: tuple[str, int], source: str, deadline: float, request: bytes) -> Call:
    """Connect from `source`, send `request` (if any), read until the service hangs up, and say
    how it went."""
    started = time.perf_counter()
    failure: str | None
    confirmation: str | None = None
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection(*service, local_addr=(source, 0))
            writer.write(request)
            try:
                tail = await _read_tail(reader)
            finally:
                writer.close()
        failure = transcript_failure(tail)
        confirmation = transcript_confirmation(tail)
    except TimeoutError:
        failure = "timeout"
    except ConnectionRefusedError:
        failure = "refused"
    except ConnectionResetError:
        failure = "reset"
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno or 0, "OSError")
    return Call(started, time.perf_counter(), failure, confirmation)


async def call_all(
    services: Sequence[tuple[str, int]],
    sources: Sequence[str],
    timeout: float,
    request: bytes = b"",
) -> list[Call]:
    """Every caller at once, caller i through service i mod their number, all bounded by one
    deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    return await asyncio.gather(
        *(
            call(services[index % len(services)], source, deadline, request)
            for index, source in enumerate(sources)
        )
    )


# Runs


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    sessions: int
    verdicts: int
    failures: Mapping[str, int]
    wall_s: float
    p50_s: float
    p99_s: float
    idle_rss_mb: float
    peak_rss_mb: float
    service_cpu_s: float
    fake_cpu_s: float
    callers_cpu_s: float
    other_cpu_s: float
    """The machine's busy CPU time less the others here: kernel work and other processes."""
    label: str = ""
    replica_peak_rss_mb: tuple[float, ...] = ()
    replica_cpu_s: tuple[float, ...] = ()
    redis: RedisUse | None = None
    counters: Mapping[str, float] = field(default_factory=dict)
    confirmations: Mapping[str, int] = field(default_factory=dict)

    @property
    def sessions_per_s(self) -> float:
        return self.verdicts / self.wall_s

    def per_test(self, count: float) -> float:
        return count / self.verdicts if self.verdicts else float("nan")

    @property
    def service_cpu_per_test_s(self) -> float:
        return self.per_test(self.service_cpu_s)

    @property
    def service_over_fake_cpu(self) -> float:
        """The service's CPU over the fake mail server's, for the same conversations."""
        return self.service_cpu_s / self.fake_cpu_s if self.fake_cpu_s else float("nan")

    def missed_targets(self) -> list[str]:
        missed = []
        if self.verdicts < self.sessions:
            missed.append(f"{self.sessions - self.verdicts} sessions without a verdict")
        if self.sessions_per_s < TARGET_SESSIONS_PER_S:
            missed.append(f"under {TARGET_SESSIONS_PER_S:g} sessions/s")
        if self.peak_rss_mb >= TARGET_PEAK_RSS_MB:
            missed.append(f"peak RSS not under {TARGET_PEAK_RSS_MB:g} MB")
        return missed

    def as_json(self) -> dict[str, object]:
        return {
            "setup": self.label,
            "sessions": self.sessions,
            "verdicts": self.verdicts,
            "failures": dict(self.failures),
            "wall_s": round(self.wall_s, 3),
            "sessions_per_s": round(self.sessions_per_s, 1),
            "p50_s": round(self.p50_s, 3),
            "p99_s": round(self.p99_s, 3),
            "idle_rss_mb": round(self.idle_rss_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "service_cpu_s": round(self.service_cpu_s, 2),
            "fake_cpu_s": round(self.fake_cpu_s, 2),
            "callers_cpu_s": round(self.callers_cpu_s, 2),
            "other_cpu_s": round(self.other_cpu_s, 2),
            "service_cpu_ms_per_test": round(1000 * self.service_cpu_per_test_s, 2),
            "service_over_fake_cpu": round(self.service_over_fake_cpu, 2),
            "replica_peak_rss_mb": [round(mb, 1) for mb in self.replica_peak_rss_mb],
            "replica_cpu_s": [round(seconds, 2) for seconds in self.replica_cpu_s],
            "redis": None if self.redis is None else self.redis_json(self.redis),
            "counters": dict(self.counters),
            "confirmations": dict(self.confirmations),
            "missed_targets": self.missed_targets(),
        }

    def redis_json(self, use: RedisUse) -> dict[str, object]:
        return {
            "cpu_s": round(use.cpu_s, 2),
            "round_trips": use.round_trips,
            "round_trips_per_test": round(self.per_test(use.round_trips), 2),
            "commands_per_test": round(self.per_test(sum(use.calls.values())), 2),
            "calls_per_test": {
                name: round(self.per_test(count), 2) for name, count in use.calls.items()
            },
        }


def percentile(values: Sequence[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def megabytes(kib: int) -> float:
    return kib * 1024 / 1e6


def run_once(
    sessions: int, timeout: float, workdir: Path, door: str = "telnet", setup: Setup = Setup()
) -> Run:
    """Fresh Redis (if the setup has it), fake and service processes, `sessions` callers at
    once, and what it took."""
    sources = caller_addresses(sessions)
    request = HTTP_REQUEST if door == "http" else b""
    replicas = [ReplicaPorts.pick(setup) for _ in range(setup.replicas)]
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(watched_redis()) if setup.redis else None
        redis_url = None if shared is None else shared.url
        fake, mail_port = stack.enter_context(
            fake_mail_process(sessions, delivery_ports(replicas) if setup.relay else ())
        )
        services = [
            stack.enter_context(
                reflector_process(
                    service_command(setup, ports, mail_port, door, redis_url),
                    workdir / f"service-{index}.log",
                )
            )
            for index, ports in enumerate(replicas)
        ]
        idle_kib = max(proc_status_kib(service.pid, "VmRSS") for service in services)
        services_cpu = [cpu_seconds(service.pid) for service in services]
        fake_cpu = cpu_seconds(fake.pid)
        redis_before = None if shared is None else shared.counts()
        callers_cpu, machine_busy = time.process_time(), machine_busy_seconds()
        doors = [("127.0.0.1", ports.door) for ports in replicas]
        calls = runtime.run(call_all(doors, sources, timeout, request))
        callers_cpu = time.process_time() - callers_cpu
        machine_busy = machine_busy_seconds() - machine_busy
        services_cpu = [
            cpu_seconds(service.pid) - before
            for service, before in zip(services, services_cpu, strict=True)
        ]
        fake_cpu = cpu_seconds(fake.pid) - fake_cpu
        redis_use = (
            None
            if shared is None or redis_before is None
            else RedisUse.between(redis_before, shared.counts())
        )
        peaks_kib = [proc_status_kib(service.pid, "VmHWM") for service in services]
        counters: Counter[str] = Counter()
        for ports in replicas:
            if ports.http is not None:
                counters.update(scrape_counters(ports.http))
    seconds = [one.seconds for one in calls]
    service_cpu = sum(services_cpu)
    redis_cpu = 0.0 if redis_use is None else redis_use.cpu_s
    return Run(
        sessions=sessions,
        verdicts=sum(1 for one in calls if one.failure is None),
        failures=Counter(one.failure for one in calls if one.failure is not None),
        wall_s=max(one.ended for one in calls) - min(one.started for one in calls),
        p50_s=percentile(seconds, 50),
        p99_s=percentile(seconds, 99),
        idle_rss_mb=megabytes(idle_kib),
        peak_rss_mb=megabytes(max(peaks_kib)),
        service_cpu_s=service_cpu,
        fake_cpu_s=fake_cpu,
        callers_cpu_s=callers_cpu,
        other_cpu_s=machine_busy - service_cpu - fake_cpu - callers_cpu - redis_cpu,
        label=setup.label,
        replica_peak_rss_mb=tuple(megabytes(kib) for kib in peaks_kib),
        replica_cpu_s=tuple(services_cpu),
        redis=redis_use,
        counters=dict(counters),
        confirmations=Counter(one.confirmation for one in calls if one.confirmation is not None),
    )


def compared_setups(
    replicas: int, relay: bool, redis_timeout: float | None = None
) -> tuple[Setup, Setup]:
    """One replica with its state in memory, and `replicas` sharing Redis."""
    return (
        Setup(stateful=True, relay=relay),
        Setup(
            replicas=replicas, redis=True, stateful=True, relay=relay, redis_timeout=redis_timeout
        ),
    )


def run_order(setups: Sequence[Setup], repeat: int) -> list[Setup]:
    """Each setup once per repeat, the order reversed every other repeat, so that neither
    always runs first on a machine that warms up or gets busier."""
    return [
        setup
        for index in range(repeat)
        for setup in (setups if index % 2 == 0 else list(reversed(setups)))
    ]


def benchmark(
    session_counts: Sequence[int],
    repeat: int,
    timeout: float,
    door: str = "telnet",
    setups: Sequence[Setup] = (Setup(),),
) -> list[Run]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="relayprobe-load-") as workdir:
        for setup in run_order(setups, repeat):
            for sessions in session_counts:
                runs.append(run_once(sessions, timeout, Path(workdir), door, setup))
    return runs


@dataclass(frozen=True, slots=True)
class Summary:
    """The runs of one setup and session count: medians, and the worst of each figure."""

    label: str
    sessions: int
    runs: int
    median_sessions_per_s: float
    worst_sessions_per_s: float
    median_p50_s: float
    median_p99_s: float
    worst_p99_s: float
    worst_peak_rss_mb: float
    runs_meeting_targets: int

    def as_json(self) -> dict[str, object]:
        return {
            "setup": self.label,
            "sessions": self.sessions,
            "runs": self.runs,
            "median_sessions_per_s": round(self.median_sessions_per_s, 1),
            "worst_sessions_per_s": round(self.worst_sessions_per_s, 1),
            "median_p50_s": round(self.median_p50_s, 3),
            "median_p99_s": round(self.median_p99_s, 3),
            "worst_p99_s": round(self.worst_p99_s, 3),
            "worst_peak_rss_mb": round(self.worst_peak_rss_mb, 1),
            "runs_meeting_targets": self.runs_meeting_targets,
        }


def summarize(runs: Sequence[Run]) -> list[Summary]:
    summaries = []
    for label, sessions in dict.fromkeys((run.label, run.sessions) for run in runs):
        mine = [run for run in runs if (run.label, run.sessions) == (label, sessions)]
        rates = [run.sessions_per_s for run in mine]
        summaries.append(
            Summary(
                label=label,
                sessions=sessions,
                runs=len(mine),
                median_sessions_per_s=statistics.median(rates),
                worst_sessions_per_s=min(rates),
                median_p50_s=statistics.median(run.p50_s for run in mine),
                median_p99_s=statistics.median(run.p99_s for run in mine),
                worst_p99_s=max(run.p99_s for run in mine),
                worst_peak_rss_mb=max(run.peak_rss_mb for run in mine),
                runs_meeting_targets=sum(1 for run in mine if not run.missed_targets()),
            )
        )
    return summaries


@dataclass(frozen=True, slots=True)
class Figure:
    """A figure of a run that comparisons compare: its JSON name, its label and how to get it."""

    name: str
    label: str
    of: Callable[[Run], float]


COMPARED_FIGURES = (
    Figure("sessions_per_s", "sessions/s", lambda run: run.sessions_per_s),
    Figure("p99", "p99", lambda run: run.p99_s),
    Figure("service_cpu_per_test", "service CPU per test", lambda run: run.service_cpu_per_test_s),
)


@dataclass(frozen=True, slots=True)
class Ratio:
    """A figure of the other setup over the baseline's: of their medians, and of each pair of
    runs (the k-th run of each)."""

    figure: Figure
    median: float
    pairs: tuple[float, ...]

    @classmethod
    def of(cls, figure: Figure, firsts: Sequence[Run], seconds: Sequence[Run]) -> Ratio:
        first, second = (statistics.median(map(figure.of, runs)) for runs in (firsts, seconds))
        pairs = zip(firsts, seconds, strict=False)
        return cls(figure, second / first, tuple(figure.of(b) / figure.of(a) for a, b in pairs))

    def __str__(self) -> str:
        pairs = ", ".join(f"{pair:.2f}" for pair in self.pairs)
        return f"{self.figure.label} {self.median:.2f}x (pairs {pairs})"


@dataclass(frozen=True, slots=True)
class Comparison:
    """One setup against another at one session count, figure by figure."""

    sessions: int
    baseline: str
    other: str
    ratios: tuple[Ratio, ...]

    def as_json(self) -> dict[str, object]:
        report: dict[str, object] = {
            "sessions": self.sessions,
            "baseline": self.baseline,
            "other": self.other,
        }
        for ratio in self.ratios:
            report[f"{ratio.figure.name}_ratio"] = round(ratio.median, 3)
            report[f"pair_{ratio.figure.name}_ratios"] = [round(pair, 3) for pair in ratio.pairs]
        return report


def compare(runs: Sequence[Run], baseline: str, other: str) -> list[Comparison]:
    comparisons = []
    for sessions in dict.fromkeys(run.sessions for run in runs):
        firsts = [run for run in runs if (run.label, run.sessions) == (baseline, sessions)]
        seconds = [run for run in runs if (run.label, run.sessions) == (other, sessions)]
        if not firsts or not seconds:
            continue
        ratios = tuple(Ratio.of(figure, firsts, seconds) for figure in COMPARED_FIGURES)
        comparisons.append(Comparison(sessions, baseline, other, ratios))
    return comparisons


def print_replicas(runs: Sequence[Run]) -> None:
    """What the replicas mode adds, run by run: each replica, Redis, counters, confirmation."""
    print(
        f"\n{'setup':<14} {'sessions':>8} {'peak MB per replica':<20} {'CPU s per replica':<18} "
        f"{'Redis CPU s':>11} {'RT/test':>7} {'cmds/test':>9}  counters; confirmation"
    )
    for run in runs:
        peaks = "/".join(f"{mb:.1f}" for mb in run.replica_peak_rss_mb)
        cpus = "/".join(f"{seconds:.1f}" for seconds in run.replica_cpu_s)
        use = run.redis
        redis_figures = (
            f"{'-':>11} {'-':>7} {'-':>9}"
            if use is None
            else f"{use.cpu_s:>11.2f} {run.per_test(use.round_trips):>7.2f} "
            f"{run.per_test(sum(use.calls.values())):>9.2f}"
        )
        counters = ", ".join(f"{name} {count:g}" for name, count in run.counters.items())
        confirmations = ", ".join(f"{kind} {n}" for kind, n in sorted(run.confirmations.items()))
        print(
            f"{run.label:<14} {run.sessions:>8} {peaks:<20} {cpus:<18} {redis_figures}  "
            f"{counters}; {confirmations or 'none said'}"
        )
        if use is not None:
            top = list(use.calls.items())[:TOP_COMMANDS]
            print(
                "    calls per test: "
                + ", ".join(f"{name} {run.per_test(count):.2f}" for name, count in top)
            )


def print_table(runs: Sequence[Run], replicas: bool = False) -> None:
    print(
        f"{'setup':<20} {'sessions':>8} {'verdicts':>8} {'wall s':>7} {'sess/s':>7} "
        f"{'p50 s':>6} {'p99 s':>6} {'idle MB':>7} {'peak MB':>7}  "
        f"{'CPU s service/fake/callers/other':<32} {'ms/test':>7} {'/fake':>5}  failures"
    )
    for run in runs:
        cpu = (
            f"{run.service_cpu_s:.1f}/{run.fake_cpu_s:.1f}/{run.callers_cpu_s:.1f}"
            f"/{run.other_cpu_s:.1f}"
        )
        failures = ", ".join(f"{kind} {count}" for kind, count in sorted(run.failures.items()))
        print(
            f"{run.label:<20} {run.sessions:>8} {run.verdicts:>8} {run.wall_s:>7.2f} "
            f"{run.sessions_per_s:>7.0f} {run.p50_s:>6.2f} {run.p99_s:>6.2f} "
            f"{run.idle_rss_mb:>7.1f} {run.peak_rss_mb:>7.1f}  {cpu:<32} "
            f"{1000 * run.service_cpu_per_test_s:>7.2f} {run.service_over_fake_cpu:>4.2f}x  "
            f"{failures or 'none'}"
        )
    for run in runs:
        missed = run.missed_targets()
        if missed:
            print(f"{run.label}: {run.sessions} sessions missed targets: {'; '.join(missed)}")
    if replicas:
        print_replicas(runs)
    for summary in summarize(runs):
        print(
            f"{summary.label}: {summary.sessions} sessions, {summary.runs} runs: "
            f"{summary.median_sessions_per_s:.0f} sessions/s median "
            f"({summary.worst_sessions_per_s:.0f} worst), p50 {summary.median_p50_s:.2f} s median, "
            f"p99 {summary.median_p99_s:.2f} s median ({summary.worst_p99_s:.2f} worst), "
            f"peak RSS {summary.worst_peak_rss_mb:.1f} MB worst; targets met in "
            f"{summary.runs_meeting_targets} of {summary.runs} runs"
        )


def print_comparisons(comparisons: Sequence[Comparison]) -> None:
    for one in comparisons:
        ratios = ", ".join(str(ratio) for ratio in one.ratios)
        print(f"{one.sessions} sessions, {one.other} / {one.baseline}: {ratios}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == [FAKE_COMMAND]:
        return fake_main(arguments[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        default=[100, 1000],
        metavar="N",
        help=f"concurrent sessions per run, 1..{MAX_SESSIONS} (default 100 1000)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help=f"runs per session count, 1..{MAX_REPEAT}"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=RUN_TIMEOUT_S,
        help=f"seconds a run may take, at most {MAX_RUN_TIMEOUT_S:g} (default {RUN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--door",
        choices=("telnet", "http"),
        default="telnet",
        help="the front door the callers use (default telnet)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        metavar="R",
        help=f"compare R replicas sharing Redis (2..{MAX_REPLICAS}) with one keeping its state "
        "in memory, both with rate limits and delivery confirmation on",
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="with --replicas: the fake relays every probe and delivers to a canary sink",
    )
    parser.add_argument(
        "--redis-timeout",
        type=float,
        metavar="S",
        help=f"with --replicas: the replicas' --redis-timeout, at most {MAX_REDIS_TIMEOUT_S:g} "
        "(default: the service's)",
    )
    parser.add_argument(
        "--trial",
        choices=TRIALS,
        help="run relayprobe with a part of its work taken away (see benchmarks/trials.py) "
        "instead, against the yardstick",
    )
    parser.add_argument(
        "--same-sessions",
        action="store_true",
        help="the yardstick opens a fresh SMTP session where relayprobe's error budget does "
        "(three a test here) instead of one a test",
    )
    parser.add_argument(
        "--yardsticks",
        action="store_true",
        help="no relayprobe: the yardstick holding the same sessions against the one-session "
        "yardstick (what the fresh sessions alone cost)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(arguments)
    if not all(1 <= sessions <= MAX_SESSIONS for sessions in args.sessions):
        parser.error(f"--sessions must be between 1 and {MAX_SESSIONS}")
    if not 1 <= args.repeat <= MAX_REPEAT:
        parser.error(f"--repeat must be between 1 and {MAX_REPEAT}")
    if not 0 < args.timeout <= MAX_RUN_TIMEOUT_S:
        parser.error(f"--timeout must be above 0 and at most {MAX_RUN_TIMEOUT_S:g}")
    if args.replicas is not None and not 2 <= args.replicas <= MAX_REPLICAS:
        parser.error(f"--replicas must be between 2 and {MAX_REPLICAS}")
    if args.replicas is None and (args.relay or args.redis_timeout is not None):
        parser.error("--relay and --redis-timeout need --replicas")
    if (args.trial is not None or args.same_sessions or args.yardsticks) and (
        args.replicas is not None or args.door != "telnet"
    ):
        parser.error(
            "--trial, --same-sessions and --yardsticks are for the telnet door, without --replicas"
        )
    if args.yardsticks and (args.trial is not None or args.same_sessions):
        parser.error(
            "--yardsticks runs both yardsticks and no relayprobe: no --trial or --same-sessions"
        )
    if args.redis_timeout is not None and not 0 < args.redis_timeout <= MAX_REDIS_TIMEOUT_S:
        parser.error(f"--redis-timeout must be above 0 and at most {MAX_REDIS_TIMEOUT_S:g}")
    setups: tuple[Setup, ...]
    if args.replicas is not None:
        setups = compared_setups(args.replicas, args.relay, args.redis_timeout)
    elif args.yardsticks:
        setups = (Setup(yardstick=True), Setup(yardstick=True, same_sessions=True))
    elif args.door == "telnet":
        setups = (Setup(yardstick=True, same_sessions=args.same_sessions), Setup(trial=args.trial))
    else:
        setups = (Setup(),)
    if any(setup.redis for setup in setups) and (missing := redis_available()):
        parser.error(missing)
    raise_file_limit()
    load_before = os.getloadavg()
    try:
        runs = benchmark(args.sessions, args.repeat, args.timeout, args.door, setups)
    except BenchmarkError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 1
    load_after = os.getloadavg()
    comparisons = compare(runs, setups[0].label, setups[-1].label) if len(setups) > 1 else []
    if args.json:
        report = {
            "load_average_before": load_before,
            "load_average_after": load_after,
            "runs": [run.as_json() for run in runs],
            "summaries": [summary.as_json() for summary in summarize(runs)],
            "comparisons": [comparison.as_json() for comparison in comparisons],
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(runs, replicas=args.replicas is not None)
        print_comparisons(comparisons)
        print(
            "load average (1/5/15 min) before "
            + " ".join(f"{value:.2f}" for value in load_before)
            + ", after "
            + " ".join(f"{value:.2f}" for value in load_after)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
