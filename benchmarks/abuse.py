"""Attack a fresh `relayprobe serve` on loopback and measure whether everyone else is still served.

Each attack of issue 8 runs against its own service process (telnet on 127.0.0.1, /healthz and
/metrics on --http-listen, the canary sink on --sink-listen, history in a temporary directory,
JSON log), whose callers' port 25 is a fake mail server (relayprobe.fakemx) in a helper process.
Side by side with the attack, an observer process runs a normal caller's test every 0.25 s, each
from a fresh 127.80.x.1 address, and polls /healthz every 0.1 s: first for an idle baseline, then
during the attack. The observer and the fakes are processes of their own, so a busy attacker
cannot pass for a slow service.

Per attack the table shows the normal caller's median test during the attack over its median
idle test, and the slowest in brackets (a refusal or a timeout instead, if there was one), the
slowest /healthz answer during the attack, the service's peak RSS (VmHWM), and the session slots
leaked: still held a settle time after the attack's connections closed and DRAIN_WAIT_S more
(a slot held that long by an attacker's own running test is shown as held), as the larger of
relayprobe_active_sessions and telnet connections less refused and ended sessions in the
service's log, with a fresh caller then refused counting as a leak too. PASS or MISS is against
the issue's targets: under 3x idle, /healthz under 1 s, no leaked slot, RSS under 200 MB; and an
attack's own checks: verdict (every half-closed caller gets one), hang-up (no SMTP session goes
on over 1 s after its caller hung up), delivery (with the sink held full, another address is
still greeted and an open relay's test is still confirmed), sink drops (the sink hangs up on an
RCPT flooder), kernel memory (at most 1 MB per non-reading caller) and CPU (hostile replies at
most 3x the CPU of plain ones).
A MISS is a finding, not an error: the exit status is non-zero only when the benchmark fails.

Rate limits stay at their defaults, except --rate-global 1000 for the attacks marked * in the
table, which need more than 5 admitted tests a second to mean anything; the per-address and
per-/24 limits always apply, and such attackers come from a /24 each. Every service gets
--confirm-wait 5 (2 with --quick), so a lost test message costs seconds, not 30.

Run from the repository root:

    .venv/bin/python -m benchmarks.abuse [--only NAME ...] [--seconds N] [--quick] [--json]

(`python -m benchmarks.abuse helper CONFIG` is the fake mail server and observer process.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.load import (
    READ_CHUNK,
    REPOSITORY,
    STARTUP_TIMEOUT_S,
    TAIL_BYTES,
    TARGET_PEAK_RSS_MB,
    BenchmarkError,
    Call,
    call,
    cpu_seconds,
    free_port,
    megabytes,
    proc_status_kib,
    raise_file_limit,
    service_environment,
    wait_until_listening,
)
from relayprobe.fakemx import FakeMailServer, SessionState, relays_everything, relays_nothing
from relayprobe.operations import runtime

T = TypeVar("T")

HELPER_COMMAND = "helper"
TEST_DOMAIN = "relaytest.invalid"
RAISED_RATE_GLOBAL = ("--rate-global", "1000")

# Targets of the issue.
TARGET_RATIO = 3.0
# How long slots still held after an attack may take to come back before they count as leaked:
# longer than the slowest attacker's own test (60 replies at 0.5 s).
DRAIN_WAIT_S = 40.0
TARGET_HEALTHZ_S = 1.0
# Attack-specific checks of this benchmark (the issue gives no figure): hostile replies may cost
# at most 3x the CPU of plain ones; a non-reading caller may pin at most 1 MB of kernel memory
# (the 256 KiB output cap plus a small send buffer, with room to spare).
TARGET_CPU_FACTOR = 3.0
TARGET_KERNEL_MB_PER_CALLER = 1.0

NORMAL_PERIOD_S = 0.25
HEALTHZ_PERIOD_S = 0.1
HEALTHZ_TIMEOUT_S = 3.0
HTTP_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 3.0
HELPER_LIFETIME_S = 900.0
MAX_SECONDS = 60.0
SMALL_RCVBUF = 4096

# Fake replies: 24 filler lines before the reply's own line make 25 lines of 1,200 bytes.
FILLER_LINES = 24
FILLER_BYTES = 1200
ESCAPES = b"\x1b" * FILLER_BYTES

# Loopback addresses by role, clear of 127.0.0.x (tests, Postfix) and 127.77.x (benchmarks.load).
NORMAL_OCTET = 80  # 127.80.x.1 onwards, one /24 per normal test
FRESH_CALLER = "127.85.0.1"
ATTACKER_OCTET = 100  # 127.100.x.1 onwards, one /24 per attacker
PLAIN_ATTACKER_OCTET = 110  # the plain-reply half of the hostile-replies attack
SINK_HOLDER = "127.91.0.1"
SINK_OTHER = "127.91.1.1"
RELAY_CALLERS = ("127.92.0.1", "127.92.1.1")  # before and during the sink attack
SINK_FLOOD_NETWORK = "127.93.0."

FLOOD_BYTES_PER_S = 1_000_000
FLOOD_CHUNK = 64 * 1024
HANG_UP_AFTER_S = 1.0
LATE_AFTER_S = 1.0
MIN_WATCH_S = 2.0  # past LATE_AFTER_S, however short the attack
SINK_CONNECTION_CAP = 100
SINK_FLOOD_CONNECTIONS = 50
RCPT_BATCH = 20
UNKNOWN_RCPT = f"RCPT TO:<nobody-aaaaaaaaaa@{TEST_DOMAIN}>\r\n".encode()
RECONNECT_PAUSE_S = 0.01
ESTABLISHED = 1  # tcpi_state of TCP_INFO
PR_SET_PDEATHSIG = 1


def spread(first_octet: int, count: int) -> list[str]:
    """`count` loopback addresses, each in a /24 of its own: 127.<first>.0.1, 127.<first>.1.1..."""
    return [f"127.{first_octet + index // 256}.{index % 256}.1" for index in range(count)]


# The fake mail servers


@dataclass(frozen=True, slots=True)
class FakeKind:
    """How the fake mail server on a caller's address behaves."""

    reply_delay: float = 0.0
    filler: bytes = b""
    """Each reply comes after FILLER_LINES continuation lines of this."""
    relays: bool = False
    """Accept every recipient and deliver the test messages to the canary sink."""
    records: bool = False
    """Keep the time each command arrived."""


FAKE_KINDS = {
    "plain": FakeKind(),
    "slow": FakeKind(reply_delay=0.5),
    "slow-escapes": FakeKind(reply_delay=0.3, filler=ESCAPES, records=True),
    "long": FakeKind(filler=b"a" * FILLER_BYTES),
    "hostile": FakeKind(filler=ESCAPES),
    "relay": FakeKind(relays=True),
}


class AbuseMailServer(FakeMailServer):
    """A FakeMailServer with long replies and command times, which fakemx has no option for."""

    def __init__(self, kind: FakeKind, *, sink: tuple[str, int]) -> None:
        super().__init__(
            relay=relays_everything if kind.relays else relays_nothing,
            reply_delay=kind.reply_delay,
            forward_to=sink if kind.relays else None,
            forward_domain=TEST_DOMAIN,
        )
        self.kind = kind
        self.command_times: list[float] = []

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if self.kind.records:
            self.command_times.append(time.perf_counter())
        reply = super().reply(line, session)
        if not reply or not self.kind.filler:
            return reply
        return (reply[:3] + b"-" + self.kind.filler + b"\r\n") * FILLER_LINES + reply


# The helper process: fake mail servers, and the observer when asked


async def _start_fakes(
    port: int, fakes: dict[str, list[str]], sink: tuple[str, int]
) -> dict[str, AbuseMailServer]:
    servers: dict[str, AbuseMailServer] = {}
    for kind, addresses in fakes.items():
        for address in addresses:
            server = AbuseMailServer(FAKE_KINDS[kind], sink=sink)
            await server.start(address, port)
            servers[address] = server
    return servers


def _fake_stats(servers: dict[str, AbuseMailServer]) -> dict[str, Any]:
    return {
        "sessions": sum(server.sessions for server in servers.values()),
        "command_times": {
            address: server.command_times
            for address, server in servers.items()
            if server.kind.records
        },
    }


async def http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """Status and body of one GET (the caller bounds it in time)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read(1 << 20)
        while chunk := await reader.read(1 << 20):
            response += chunk
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    return (int(status[0]) if status and status[0].isdigit() else 0), body


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await stop.wait()


async def _normal_calls(
    config: dict[str, Any], stop: asyncio.Event, calls: list[list[Any]]
) -> None:
    """A test every period from a fresh address, each read to the end, until told to stop."""
    loop = asyncio.get_running_loop()
    telnet = tuple(config["telnet"])
    for source in config["normal"]:
        if stop.is_set():
            return
        one = await call(telnet, source, loop.time() + config["call_timeout"], b"")
        calls.append([one.started, one.ended, one.failure])
        await _wait_or_stop(stop, one.started + config["period"] - time.perf_counter())


async def _poll_healthz(address: tuple[str, int], polls: list[list[Any]]) -> None:
    while True:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(HEALTHZ_TIMEOUT_S):
                status, _ = await http_get(address, "/healthz")
            outcome = "ok" if status == 200 else f"HTTP {status}"
        except TimeoutError:
            outcome = "timeout"
        except OSError as exc:
            outcome = type(exc).__name__
        polls.append([started, time.perf_counter() - started, outcome])
        await asyncio.sleep(HEALTHZ_PERIOD_S)


async def _observe(config: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    calls: list[list[Any]] = []
    polls: list[list[Any]] = []
    polling = asyncio.create_task(_poll_healthz(tuple(config["http"]), polls))
    try:
        await _normal_calls(config, stop, calls)
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
    return {"calls": calls, "healthz": polls}


async def _stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _helper(config: dict[str, Any]) -> None:
    """Serve the fakes; on `go`, observe; on `stats`, print the fakes' figures; at EOF, all."""
    sink = (config["sink"][0], config["sink"][1])
    servers = await _start_fakes(config["port"], config["fakes"], sink)
    print("ready", flush=True)
    commands = await _stdin_lines()
    stop = asyncio.Event()
    observing: asyncio.Task[dict[str, Any]] | None = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(HELPER_LIFETIME_S):
            while line := await commands.readline():
                if line.strip() == b"go" and config.get("observe") and observing is None:
                    observing = asyncio.create_task(_observe(config["observe"], stop))
                elif line.strip() == b"stats":
                    print(json.dumps(_fake_stats(servers)), flush=True)
    stop.set()
    observed = await observing if observing is not None else {}
    print(json.dumps({**observed, **_fake_stats(servers)}), flush=True)
    # The figures are out; the sessions still open end with the process, without a log each.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)


def helper_main(argv: Sequence[str]) -> int:
    # The benchmark stops its helpers itself; Ctrl-C in the terminal is its business.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_file_limit()
    runtime.run(_helper(json.loads(argv[0])))
    return 0


# Processes seen from the benchmark


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def spawned(command: list[str], **options: Any) -> Iterator[subprocess.Popen[str]]:
    """A child process that is ended on the way out, however the way out is taken."""
    process = subprocess.Popen(
        command, cwd=REPOSITORY, text=True, preexec_fn=_die_with_parent, **options
    )
    try:
        yield process
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        _end(process)


class Helper:
    """The benchmark's side of a helper process: one line per request on stdin and stdout."""

    def __init__(self, process: subprocess.Popen[str], role: str) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.role = role

    def _line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise BenchmarkError(f"the {self.role} did not answer (exit {self.process.poll()})")
        return line

    def wait_ready(self) -> None:
        if self._line(STARTUP_TIMEOUT_S).strip() != "ready":
            raise BenchmarkError(f"the {self.role} did not start")

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        result: dict[str, Any] = json.loads(self._line(HTTP_TIMEOUT_S))
        return result

    def finish(self, timeout: float) -> dict[str, Any]:
        """Close its stdin and return what it printed last."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        result: dict[str, Any] = json.loads(self._line(timeout))
        return result


def helper_command(config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.abuse", HELPER_COMMAND, json.dumps(config)]


@dataclass(frozen=True, slots=True)
class Ports:
    telnet: int
    http: int
    sink: int
    mail: int

    @classmethod
    def free(cls) -> Ports:
        ports: list[int] = []
        while len(ports) < 4:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)


def service_command(
    ports: Ports, state_dir: Path, scale: Scale, options: Sequence[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "relayprobe",
        "serve",
        "--listen",
        f"127.0.0.1:{ports.telnet}",
        "--http-listen",
        f"127.0.0.1:{ports.http}",
        "--sink-listen",
        f"127.0.0.1:{ports.sink}",
        "--test-domain",
        TEST_DOMAIN,
        "--target-port",
        str(ports.mail),
        "--state-dir",
        str(state_dir),
        "--confirm-wait",
        f"{scale.confirm_wait_s:g}",
        "--log-format",
        "json",
        *options,
    ]


def log_events(log_path: Path) -> list[dict[str, Any]]:
    """The service's JSON log lines so far (a line being written is skipped)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def tcp_memory_bytes() -> int:
    """The kernel's TCP buffer memory, all sockets together (/proc/net/sockstat)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    raise BenchmarkError("no TCP line in /proc/net/sockstat")


# What an attack works with


@dataclass(frozen=True, slots=True)
class Scale:
    seconds: float
    quick: bool

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    @property
    def idle_s(self) -> float:
        return 0.8 if self.quick else 2.0

    @property
    def settle_s(self) -> float:
        return 0.8 if self.quick else 2.0

    @property
    def call_timeout_s(self) -> float:
        return 5.0 if self.quick else 10.0

    @property
    def confirm_wait_s(self) -> float:
        return 2.0 if self.quick else 5.0

    @property
    def normal_callers(self) -> int:
        """Enough addresses for the normal caller through the idle time and two attack windows."""
        observed = self.idle_s + 2 * self.seconds + self.call_timeout_s
        return math.ceil(observed / NORMAL_PERIOD_S) + 10


@dataclass(slots=True)
class Rig:
    """The running service as an attack sees it."""

    telnet: tuple[str, int]
    http: tuple[str, int]
    sink: tuple[str, int]
    pid: int
    log_path: Path
    scale: Scale
    fake: Helper
    window_start: float = 0.0
    rss_at_start_kib: int = 0
    connects: int = 0
    """Telnet connections the attack made, for the leak count."""

    def remaining(self) -> float:
        return max(0.0, self.window_start + self.scale.seconds - time.perf_counter())

    async def connect_telnet(self, source: str, *, rcvbuf: int | None = None) -> socket.socket:
        sock = await connect_from(source, self.telnet, rcvbuf=rcvbuf)
        self.connects += 1
        return sock

    def rss_growth_mb(self) -> float:
        return megabytes(proc_status_kib(self.pid, "VmHWM") - self.rss_at_start_kib)


async def connect_from(
    source: str, address: tuple[str, int], *, rcvbuf: int | None = None
) -> socket.socket:
    """A non-blocking TCP socket from `source` connected to `address`."""
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        sock.bind((source, 0))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def read_socket(sock: socket.socket, seconds: float) -> tuple[int, bytes]:
    """Read until EOF or for `seconds`; the byte count and the last bytes."""
    loop = asyncio.get_running_loop()
    total, tail = 0, b""
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(max(0.0, seconds)):
            while chunk := await loop.sock_recv(sock, READ_CHUNK):
                total += len(chunk)
                tail = (tail + chunk)[-TAIL_BYTES:]
    return total, tail


def has_verdict(tail: bytes) -> bool:
    return b"\r\nSystem appeared to " in tail


async def paced(
    count: int, per_second: float, one: Callable[[int], Coroutine[Any, Any, T]]
) -> list[T]:
    """`one(0)` .. `one(count - 1)`, started `per_second` a second; all their results."""
    tasks: list[asyncio.Task[T]] = []
    async with asyncio.TaskGroup() as group:
        for index in range(count):
            tasks.append(group.create_task(one(index)))
            await asyncio.sleep(1 / per_second)
    return [task.result() for task in tasks]


async def active_sessions(http: tuple[str, int]) -> int | None:
    """relayprobe_active_sessions from /metrics; None when /metrics does not answer in time."""
    try:
        async with asyncio.timeout(HTTP_TIMEOUT_S):
            _, body = await http_get(http, "/metrics")
    except (TimeoutError, OSError):
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("relayprobe_active_sessions "):
            return round(float(line.split()[1]))
    return None


# The attacks: the window lasts `seconds` unless the attack takes longer.


@dataclass(frozen=True, slots=True)
class Finding:
    """What an attack found beyond the common figures: a note, and its own targets missed."""

    note: str
    missed: tuple[str, ...] = ()


def missed_if(condition: bool, target: str) -> tuple[str, ...]:
    return (target,) if condition else ()


async def connect_and_close(rig: Rig, *, count: int, per_second: float) -> Finding:
    sources = spread(ATTACKER_OCTET, count)

    async def one(index: int) -> bool:
        try:
            sock = await rig.connect_telnet(sources[index])
        except (OSError, TimeoutError):
            return False
        sock.close()
        return True

    done = await paced(count, per_second, one)
    return Finding(f"{sum(done)} connect-and-close (nc -z) from {count} /24s at {per_second:g}/s")


async def half_close(rig: Rig, *, count: int, per_second: float) -> Finding:
    sources = spread(ATTACKER_OCTET, count)

    async def one(index: int) -> tuple[int, bool]:
        try:
            sock = await rig.connect_telnet(sources[index])
        except (OSError, TimeoutError):
            return 0, False
        with sock:
            sock.shutdown(socket.SHUT_WR)
            received, tail = await read_socket(sock, max(rig.remaining(), 2.0))
        return received, has_verdict(tail)

    results = await paced(count, per_second, one)
    answered = sum(1 for received, _ in results if received)
    verdicts = sum(1 for _, verdict in results if verdict)
    return Finding(
        f"{count} half-closes (SHUT_WR) at {per_second:g}/s: {verdicts} got a verdict, "
        f"{answered} got any bytes",
        missed_if(verdicts < count, "verdict"),
    )


async def telnet_flood(rig: Rig, *, pattern: bytes, what: str, reads: bool) -> Finding:
    """One admitted caller sends `pattern` at 1 MB/s, reading the transcript or not."""
    sock = await rig.connect_telnet(
        spread(ATTACKER_OCTET, 1)[0], rcvbuf=None if reads else SMALL_RCVBUF
    )
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            first = await reader.readline()
        if not first.startswith(b"Connecting to "):
            return Finding(f"the flooder was not admitted: {first[:80]!r}", ("admitted",))
        discarding = asyncio.create_task(reader.read(-1)) if reads else None
        chunk = pattern * (FLOOD_CHUNK // len(pattern))
        started = time.perf_counter()
        sent, ended = 0, "the flood ran to the end"
        while (remaining := rig.remaining()) > 0:
            if discarding is not None and discarding.done():
                ended = f"the service hung up after {time.perf_counter() - started:.1f} s"
                break
            ahead = sent / FLOOD_BYTES_PER_S - (time.perf_counter() - started)
            if ahead > 0:
                await asyncio.sleep(min(ahead, remaining))
                continue
            writer.write(chunk)
            try:
                async with asyncio.timeout(remaining):
                    await writer.drain()
            except TimeoutError:
                ended = "the service stopped reading"
                break
            except OSError:
                ended = f"the service hung up after {time.perf_counter() - started:.1f} s"
                break
            sent += len(chunk)
        if discarding is not None:
            discarding.cancel()
        seconds = time.perf_counter() - started
        return Finding(
            f"{sent / 1e6:.1f} MB of {what} in {seconds:.1f} s"
            f"{'' if reads else ', reading nothing'}; {ended}; "
            f"service RSS +{rig.rss_growth_mb():.1f} MB"
        )
    finally:
        writer.close()


async def hang_up(rig: Rig, *, count: int) -> Finding:
    """Callers hang up after 1 s against slow, escape-heavy servers; do their tests go on?"""
    sources = spread(ATTACKER_OCTET, count)

    async def one(index: int) -> float | None:
        try:
            sock = await rig.connect_telnet(sources[index])
        except (OSError, TimeoutError):
            return None
        with sock:
            await read_socket(sock, HANG_UP_AFTER_S)
        return time.perf_counter()

    hung_up = await paced(count, 100, one)
    last = max((left for left in hung_up if left is not None), default=time.perf_counter())
    watch_until = max(rig.window_start + rig.scale.seconds, last + LATE_AFTER_S + MIN_WATCH_S)
    await asyncio.sleep(watch_until - time.perf_counter())
    command_times = (await asyncio.to_thread(rig.fake.stats))["command_times"]
    late_sessions, late_commands, latest = 0, 0, 0.0
    for source, left in zip(sources, hung_up, strict=True):
        if left is None:
            continue
        late = [t - left for t in command_times.get(source, []) if t > left + LATE_AFTER_S]
        late_sessions += bool(late)
        late_commands += len(late)
        latest = max([latest, *late])
    return Finding(
        f"{count} callers hung up after {HANG_UP_AFTER_S:g} s: {late_sessions} SMTP sessions "
        f"went on, {late_commands} commands more than {LATE_AFTER_S:g} s after the hang-up "
        f"(the last {latest:.1f} s after; watched {watch_until - last:.0f} s)",
        missed_if(late_sessions > 0, "hang-up"),
    )


async def non_readers(rig: Rig, *, count: int) -> Finding:
    """Callers that read nothing (small receive buffer) against a long transcript."""
    sources = spread(ATTACKER_OCTET, count)
    idle_memory = peak_memory = tcp_memory_bytes()
    held: list[socket.socket] = []

    async def one(index: int) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            held.append(await rig.connect_telnet(sources[index], rcvbuf=SMALL_RCVBUF))

    try:
        await paced(count, 100, one)
        while (remaining := rig.remaining()) > 0:
            peak_memory = max(peak_memory, tcp_memory_bytes())
            await asyncio.sleep(min(0.2, remaining))
    finally:
        for sock in held:
            sock.close()
    ours = set(sources)
    ends = [
        event
        for event in log_events(rig.log_path)
        if event.get("event") == "session_end" and event.get("peer") in ours
    ]
    reasons = Counter(str(event.get("reason")) for event in ends)
    longest = max((float(event.get("duration_s", 0)) for event in ends), default=0.0)
    shown = ", ".join(f"{reason} {number}" for reason, number in reasons.most_common())
    pinned_mb = (peak_memory - idle_memory) / 1e6
    return Finding(
        f"{len(held)} callers read nothing (SO_RCVBUF {SMALL_RCVBUF}): kernel TCP memory "
        f"+{pinned_mb:.0f} MB at peak; {len(ends)} sessions ended while "
        f"they held ({shown or 'none'}), the longest after {longest:.1f} s",
        missed_if(pinned_mb > TARGET_KERNEL_MB_PER_CALLER * count, "kernel memory"),
    )


async def idle_holders(rig: Rig, *, count: int, per_second: float) -> Finding:
    """Connect, then neither send nor read nor close: do they keep their slots?"""
    sources = spread(ATTACKER_OCTET, count)
    held: list[socket.socket] = []

    async def one(index: int) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            held.append(await rig.connect_telnet(sources[index]))

    try:
        await paced(count, per_second, one)
        await asyncio.sleep(rig.remaining())
        in_use = await active_sessions(rig.http)
        hung_up_on = sum(
            1
            for sock in held
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != ESTABLISHED
        )
    finally:
        for sock in held:
            sock.close()
    return Finding(
        f"{len(held)} connections held idle at {per_second:g}/s: the service hung up on "
        f"{hung_up_on}; {in_use if in_use is not None else '?'} slots in use at the end of the hold"
    )


async def relay_check(rig: Rig, source: str) -> str:
    """An open relay's test from `source`, whose fake delivers to the sink: confirmed or not."""
    try:
        sock = await rig.connect_telnet(source)
    except (OSError, TimeoutError) as exc:
        return f"cannot connect ({type(exc).__name__})"
    with sock:
        _, tail = await read_socket(sock, rig.scale.confirm_wait_s + rig.scale.call_timeout_s)
    for line in tail.decode(errors="replace").splitlines():
        if line.startswith("Relay confirmed: "):
            return line.removeprefix("Relay confirmed: ").split(" test messages")[0] + " confirmed"
        if line.startswith("Relay not confirmed"):
            return "not confirmed"
    return "no verdict"


async def sink_greeting(sink: tuple[str, int], source: str) -> tuple[socket.socket | None, bytes]:
    try:
        sock = await connect_from(source, sink)
    except (OSError, TimeoutError) as exc:
        return None, type(exc).__name__.encode()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            greeting = await loop.sock_recv(sock, 512)
    except (TimeoutError, OSError):
        greeting = b"no greeting"
    return sock, greeting


async def sink_idle(rig: Rig) -> Finding:
    """Fill the sink's connections from one address; can another still deliver?"""
    before = await relay_check(rig, RELAY_CALLERS[0])
    held: list[socket.socket] = []
    try:
        greetings = await paced(
            SINK_CONNECTION_CAP, 500, lambda _: sink_greeting(rig.sink, SINK_HOLDER)
        )
        held = [sock for sock, _ in greetings if sock is not None]
        accepted = sum(1 for _, greeting in greetings if greeting.startswith(b"220"))
        other, other_greeting = await sink_greeting(rig.sink, SINK_OTHER)
        if other is not None:
            other.close()
        during = await relay_check(rig, RELAY_CALLERS[1])
        await asyncio.sleep(rig.remaining())
    finally:
        for sock in held:
            sock.close()
    return Finding(
        f"{accepted} idle sink connections from one address; another address was greeted "
        f"{other_greeting[:3].decode(errors='replace')!r}; an open relay's test: {during} "
        f"(before the attack: {before})",
        missed_if(not other_greeting.startswith(b"220") or during != before, "delivery"),
    )


async def _unknown_rcpts(sink: tuple[str, int], source: str, counts: Counter[str]) -> None:
    """One sink connection sending RCPTs for no test until it is dropped."""
    reader, writer = await asyncio.open_connection(*sink, local_addr=(source, 0))
    try:
        if not (await reader.readline()).startswith(b"220"):
            counts["refused"] += 1
            return
        writer.write(b"HELO flood.invalid\r\nMAIL FROM:<>\r\n")
        batch = UNKNOWN_RCPT * RCPT_BATCH
        replies_due = 2
        while True:
            for _ in range(replies_due):
                line = await reader.readline()
                if not line:
                    counts["dropped"] += 1
                    return
                counts["unknown" if line.startswith(b"550") else "other"] += 1
            writer.write(batch)
            replies_due = RCPT_BATCH
    finally:
        writer.close()


async def sink_rcpt_flood(rig: Rig, *, connections: int) -> Finding:
    counts: Counter[str] = Counter()

    async def flooder(index: int) -> None:
        source = f"{SINK_FLOOD_NETWORK}{index + 1}"
        while rig.remaining() > 0:
            try:
                async with asyncio.timeout(rig.remaining()):
                    await _unknown_rcpts(rig.sink, source, counts)
            except TimeoutError:
                return
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                counts["dropped"] += 1
            await asyncio.sleep(RECONNECT_PAUSE_S)

    started = time.perf_counter()
    await paced(connections, 500, flooder)
    rate = counts["unknown"] / (time.perf_counter() - started)
    return Finding(
        f"{counts['unknown']} unknown RCPTs answered ({rate:.0f}/s) on {connections} sink "
        f"connections from one /24; the sink hung up {counts['dropped']} times and refused "
        f"{counts['refused']} connections",
        missed_if(not counts["dropped"] and not counts["refused"], "sink drops"),
    )


@dataclass(frozen=True, slots=True)
class Phase:
    callers: int
    verdicts: int
    received: int
    verdict_bytes: int
    cpu_s: float


async def _reply_phase(rig: Rig, sources: Sequence[str]) -> Phase:
    """All `sources` test at once and read to the end, for at most `seconds`."""
    ends = time.perf_counter() + rig.scale.seconds
    cpu = cpu_seconds(rig.pid)

    async def one(index: int) -> tuple[int, bool]:
        try:
            sock = await rig.connect_telnet(sources[index])
        except (OSError, TimeoutError):
            return 0, False
        with sock:
            received, tail = await read_socket(sock, ends - time.perf_counter())
        return received, has_verdict(tail)

    results = await paced(len(sources), 200, one)
    return Phase(
        callers=len(sources),
        verdicts=sum(1 for _, verdict in results if verdict),
        received=sum(received for received, _ in results),
        verdict_bytes=sum(received for received, verdict in results if verdict),
        cpu_s=cpu_seconds(rig.pid) - cpu,
    )


async def hostile_replies(rig: Rig, *, count: int) -> Finding:
    """Plain replies first (not part of the window), then as many of 1,200 ESC bytes a line."""
    plain = await _reply_phase(rig, spread(PLAIN_ATTACKER_OCTET, count))
    rig.window_start = time.perf_counter()
    hostile = await _reply_phase(rig, spread(ATTACKER_OCTET, count))
    done = f"{hostile.verdicts}/{count} hostile and {plain.verdicts}/{count} plain tests finished"
    if not plain.verdicts or not hostile.received:
        return Finding(f"{done}; no CPU figure", ("CPU",))
    # CPU per test from CPU per transcript byte: a hostile test cut short still counts its share.
    bytes_per_test = plain.verdict_bytes / plain.verdicts
    plain_cpu = plain.cpu_s / plain.received * bytes_per_test
    hostile_cpu = hostile.cpu_s / hostile.received * bytes_per_test
    return Finding(
        f"CPU per test: ESC replies {hostile_cpu:.2f} s, plain {plain_cpu:.3f} s "
        f"({hostile_cpu / plain_cpu:.0f}x); {done} within {rig.scale.seconds:g} s each",
        missed_if(hostile_cpu > TARGET_CPU_FACTOR * plain_cpu, "CPU"),
    )


# The attack table


@dataclass(frozen=True, slots=True)
class Attack:
    name: str
    run: Callable[[Rig], Awaitable[Finding]]
    fakes: Callable[[Scale], dict[str, list[str]]]
    options: tuple[str, ...] = ()

    @property
    def rate_raised(self) -> bool:
        return RAISED_RATE_GLOBAL[0] in self.options


def _scans(scale: Scale) -> int:
    return min(scale.count(300, 50), math.ceil(50 * scale.seconds))


def _half_closes(scale: Scale) -> int:
    return min(scale.count(250, 40), math.ceil(25 * scale.seconds))


ATTACKS = (
    Attack(
        "scan",
        lambda rig: connect_and_close(rig, count=_scans(rig.scale), per_second=50),
        lambda scale: {"plain": spread(ATTACKER_OCTET, _scans(scale))},
        RAISED_RATE_GLOBAL,
    ),
    Attack(
        "scan-max3",
        lambda rig: connect_and_close(rig, count=10, per_second=50),
        lambda scale: {"plain": spread(ATTACKER_OCTET, 10)},
        ("--max-sessions", "3"),
    ),
    Attack(
        "half-close",
        lambda rig: half_close(rig, count=_half_closes(rig.scale), per_second=25),
        lambda scale: {"plain": spread(ATTACKER_OCTET, _half_closes(scale))},
        RAISED_RATE_GLOBAL,
    ),
    Attack(
        "iac-flood",
        lambda rig: telnet_flood(rig, pattern=b"\xff\xff", what="IAC IAC", reads=True),
        lambda scale: {"slow": spread(ATTACKER_OCTET, 1)},
    ),
    Attack(
        "timing-mark",
        lambda rig: telnet_flood(
            rig, pattern=b"\xff\xfd\x06", what="IAC DO TIMING-MARK", reads=False
        ),
        lambda scale: {"slow": spread(ATTACKER_OCTET, 1)},
    ),
    Attack(
        "hang-up",
        lambda rig: hang_up(rig, count=rig.scale.count(20, 10)),
        lambda scale: {"slow-escapes": spread(ATTACKER_OCTET, scale.count(20, 10))},
        RAISED_RATE_GLOBAL,
    ),
    Attack(
        "no-read",
        lambda rig: non_readers(rig, count=rig.scale.count(100, 30)),
        lambda scale: {"long": spread(ATTACKER_OCTET, scale.count(100, 30))},
        RAISED_RATE_GLOBAL,
    ),
    Attack(
        "idle-hold",
        lambda rig: idle_holders(rig, count=rig.scale.count(250, 50), per_second=50),
        lambda scale: {"plain": spread(ATTACKER_OCTET, scale.count(250, 50))},
        RAISED_RATE_GLOBAL,
    ),
    Attack(
        "sink-idle",
        sink_idle,
        lambda scale: {"relay": list(RELAY_CALLERS)},
    ),
    Attack(
        "sink-rcpt",
        lambda rig: sink_rcpt_flood(rig, connections=SINK_FLOOD_CONNECTIONS),
        lambda scale: {},
    ),
    Attack(
        "hostile",
        lambda rig: hostile_replies(rig, count=rig.scale.count(100, 20)),
        lambda scale: {
            "long": spread(PLAIN_ATTACKER_OCTET, scale.count(100, 20)),
            "hostile": spread(ATTACKER_OCTET, scale.count(100, 20)),
        },
        RAISED_RATE_GLOBAL,
    ),
)
ATTACK_NAMES = tuple(attack.name for attack in ATTACKS)


# Running one attack


@dataclass(frozen=True, slots=True)
class Measured:
    finding: Finding
    observing_from: float
    attack_start: float
    window_start: float
    window_end: float
    observed: dict[str, Any]
    active_sessions: int | None
    held_by_log: int
    fresh_caller: Call
    drained_after_s: float


async def _measure(attack: Attack, rig: Rig, observer: Helper) -> Measured:
    scale = rig.scale
    observing_from = time.perf_counter()
    observer.send("go")
    await asyncio.sleep(scale.idle_s)
    rig.window_start = attack_start = time.perf_counter()
    rig.rss_at_start_kib = proc_status_kib(rig.pid, "VmRSS")
    try:
        async with asyncio.timeout(3 * scale.seconds + 60):
            finding = await attack.run(rig)
    except TimeoutError:
        raise BenchmarkError(f"the {attack.name} attack overran its time") from None
    await asyncio.sleep(rig.remaining())
    window_end = time.perf_counter()
    observed = await asyncio.to_thread(
        observer.finish, scale.call_timeout_s + HEALTHZ_TIMEOUT_S + 5
    )
    await asyncio.sleep(scale.settle_s)
    # A slot still held may be an attacker's test that is still running (a flooder's, against a
    # slow server): held, not leaked, if it is given back when that test ends.
    gauge = await active_sessions(rig.http)
    drain_started = time.perf_counter()
    while gauge and time.perf_counter() - drain_started < DRAIN_WAIT_S:
        await asyncio.sleep(0.5)
        gauge = await active_sessions(rig.http)
    drained_after = time.perf_counter() - drain_started
    events = Counter(str(event.get("event")) for event in log_events(rig.log_path))
    normal_connects = sum(1 for _, _, failure in observed["calls"] if failure != "refused")
    held = rig.connects + normal_connects - events["session_refused"] - events["session_end"]
    loop = asyncio.get_running_loop()
    fresh = await call(rig.telnet, FRESH_CALLER, loop.time() + scale.call_timeout_s, b"")
    return Measured(
        finding=finding,
        observing_from=observing_from,
        attack_start=attack_start,
        window_start=rig.window_start,
        window_end=window_end,
        observed=observed,
        active_sessions=gauge,
        held_by_log=held,
        fresh_caller=fresh,
        drained_after_s=drained_after,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    attack: str
    rate_raised: bool
    idle_s: float
    median_s: float | None
    """The normal caller's median test in the window; None when one failed."""
    worst_s: float | None
    normal_failures: dict[str, int]
    normal_tests: int
    healthz_worst_s: float | None
    healthz_failures: int
    peak_rss_mb: float
    leaked: int
    active_sessions: int | None
    held_by_log: int
    fresh_caller: str
    note: str
    attack_missed: tuple[str, ...]

    drained_after_s: float

    @property
    def ratio(self) -> float | None:
        return None if self.median_s is None else self.median_s / self.idle_s

    @property
    def worst_ratio(self) -> float | None:
        return None if self.worst_s is None else self.worst_s / self.idle_s

    def missed_targets(self) -> list[str]:
        missed = []
        if self.ratio is None or self.ratio >= TARGET_RATIO:
            missed.append("normal")
        if self.healthz_worst_s is None or self.healthz_worst_s >= TARGET_HEALTHZ_S:
            missed.append("healthz")
        if self.leaked or self.fresh_caller != "admitted":
            missed.append("leak")
        if self.peak_rss_mb >= TARGET_PEAK_RSS_MB:
            missed.append("RSS")
        return [*missed, *self.attack_missed]

    def as_json(self) -> dict[str, object]:
        return {
            "attack": self.attack,
            "rate_global_raised": self.rate_raised,
            "idle_test_s": round(self.idle_s, 4),
            "median_test_s": None if self.median_s is None else round(self.median_s, 4),
            "worst_test_s": None if self.worst_s is None else round(self.worst_s, 4),
            "ratio": None if self.ratio is None else round(self.ratio, 2),
            "worst_ratio": None if self.worst_ratio is None else round(self.worst_ratio, 2),
            "slots_given_back_after_s": round(self.drained_after_s, 1),
            "normal_tests": self.normal_tests,
            "normal_failures": self.normal_failures,
            "healthz_worst_ms": None
            if self.healthz_worst_s is None
            else round(self.healthz_worst_s * 1000),
            "healthz_failures": self.healthz_failures,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "leaked": self.leaked,
            "active_sessions": self.active_sessions,
            "held_by_log": self.held_by_log,
            "fresh_caller": self.fresh_caller,
            "note": self.note,
            "missed_targets": self.missed_targets(),
        }


def _overlaps(started: float, ended: float, measured: Measured) -> bool:
    return started <= measured.window_end and ended >= measured.window_start


def make_row(attack: Attack, measured: Measured, peak_kib: int) -> Row:
    calls = [Call(*item) for item in measured.observed["calls"]]
    idle = [
        one.seconds
        for one in calls
        if one.failure is None
        and measured.observing_from <= one.started
        and one.ended < measured.attack_start
    ]
    if not idle:
        raise BenchmarkError(f"{attack.name}: the normal caller got no verdict before the attack")
    during = [one for one in calls if _overlaps(one.started, one.ended, measured)]
    failures = Counter(one.failure for one in during if one.failure is not None)
    polls = [
        (seconds, outcome)
        for started, seconds, outcome in measured.observed["healthz"]
        if _overlaps(started, started + seconds, measured)
    ]
    healthz_failures = sum(1 for _, outcome in polls if outcome != "ok")
    fresh = measured.fresh_caller.failure or "admitted"
    return Row(
        attack=attack.name,
        rate_raised=attack.rate_raised,
        idle_s=statistics.median(idle),
        median_s=statistics.median(one.seconds for one in during)
        if during and not failures
        else None,
        worst_s=max(one.seconds for one in during) if during and not failures else None,
        normal_failures=dict(failures),
        normal_tests=len(during),
        healthz_worst_s=max(seconds for seconds, _ in polls)
        if polls and not healthz_failures
        else None,
        healthz_failures=healthz_failures,
        peak_rss_mb=megabytes(peak_kib),
        leaked=max(measured.active_sessions or 0, measured.held_by_log, 0),
        active_sessions=measured.active_sessions,
        held_by_log=measured.held_by_log,
        fresh_caller=fresh,
        drained_after_s=measured.drained_after_s,
        note=measured.finding.note,
        attack_missed=measured.finding.missed,
    )


def run_attack(attack: Attack, scale: Scale, workdir: Path) -> Row:
    """A fresh service, fakes and observer; the attack beside the normal caller; the figures."""
    ports = Ports.free()
    sink = ["127.0.0.1", ports.sink]
    telnet, http = ("127.0.0.1", ports.telnet), ("127.0.0.1", ports.http)
    normal = spread(NORMAL_OCTET, scale.normal_callers)
    observer_config = {
        "port": ports.mail,
        "sink": sink,
        "fakes": {"plain": normal},
        "observe": {
            "telnet": telnet,
            "http": http,
            "normal": normal,
            "period": NORMAL_PERIOD_S,
            "call_timeout": scale.call_timeout_s,
        },
    }
    # The fresh caller's fake outlives the observer, which stops with the attack.
    fakes = attack.fakes(scale)
    fakes["plain"] = [*fakes.get("plain", []), FRESH_CALLER]
    fake_config = {"port": ports.mail, "sink": sink, "fakes": fakes}
    state_dir = workdir / attack.name
    state_dir.mkdir()
    log_path = workdir / f"{attack.name}.log"
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    with contextlib.ExitStack() as stack, log_path.open("w") as log:
        fake = Helper(stack.enter_context(spawned(helper_command(fake_config), **pipes)), "fake")
        observer = Helper(
            stack.enter_context(spawned(helper_command(observer_config), **pipes)), "observer"
        )
        service = stack.enter_context(
            spawned(
                service_command(ports, state_dir, scale, attack.options),
                env=service_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        fake.wait_ready()
        observer.wait_ready()
        wait_until_listening(service, log_path)
        rig = Rig(
            telnet=telnet,
            http=http,
            sink=("127.0.0.1", ports.sink),
            pid=service.pid,
            log_path=log_path,
            scale=scale,
            fake=fake,
        )
        measured = runtime.run(_measure(attack, rig, observer))
        if service.poll() is not None:
            last = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BenchmarkError(
                f"the service exited {service.returncode} during {attack.name}: {last[0][:200]}"
            )
        peak_kib = proc_status_kib(service.pid, "VmHWM")
    return make_row(attack, measured, peak_kib)


# Output


def _ratio_text(row: Row) -> str:
    if row.ratio is not None and row.worst_ratio is not None:
        return f"{row.ratio:.1f}x ({row.worst_ratio:.0f}x)"
    failed = sum(row.normal_failures.values())
    kinds = "/".join(sorted(row.normal_failures))
    return f"{kinds} {failed}/{row.normal_tests}" if row.normal_tests else "no test"


def _healthz_text(row: Row) -> str:
    if row.healthz_worst_s is not None:
        return f"{row.healthz_worst_s * 1000:.0f}"
    if row.healthz_failures:
        return f">{HEALTHZ_TIMEOUT_S * 1000:.0f} x{row.healthz_failures}"
    return "none"


def _leak_text(row: Row) -> str:
    held = f" (held {row.drained_after_s:.0f} s)" if row.drained_after_s >= 1 else ""
    leaked = f"{row.leaked}{held}"
    return leaked if row.fresh_caller == "admitted" else f"{leaked} {row.fresh_caller}"


def print_table(rows: Sequence[Row]) -> None:
    print(
        f"{'attack':<13} {'normal/idle':>14} {'healthz ms':>10} {'RSS MB':>7} {'leaked':>15}  "
        f"{'targets':<30}  note"
    )
    for row in rows:
        missed = row.missed_targets()
        targets = f"MISS {','.join(missed)}" if missed else "PASS"
        name = f"{row.attack}{'*' if row.rate_raised else ''}"
        print(
            f"{name:<13} {_ratio_text(row):>14} {_healthz_text(row):>10} "
            f"{row.peak_rss_mb:>7.1f} {_leak_text(row):>15}  {targets:<30}  {row.note}"
        )
    print(
        f"* --rate-global {RAISED_RATE_GLOBAL[1]} (other rate limits at their defaults). "
        f"normal/idle: the normal caller's median test during the attack over its median idle "
        f"test (the slowest one in brackets). "
        f"Targets: normal test under {TARGET_RATIO:g}x its idle time, /healthz under "
        f"{TARGET_HEALTHZ_S * 1000:.0f} ms, 0 leaked slots and a fresh caller admitted, "
        f"RSS under {TARGET_PEAK_RSS_MB:g} MB. '>{HEALTHZ_TIMEOUT_S * 1000:.0f} xN': N /healthz "
        f"polls failed or took longer. Idle normal test: "
        + ", ".join(f"{row.attack} {row.idle_s * 1000:.0f} ms" for row in rows)
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == [HELPER_COMMAND]:
        return helper_main(arguments[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        action="append",
        choices=ATTACK_NAMES,
        metavar="NAME",
        help=f"run only this attack (repeatable): {', '.join(ATTACK_NAMES)}",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"length of each attack, above 0 and at most {MAX_SECONDS:g} (default 10, 1.5 quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: fewer callers, shorter attacks"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(arguments)
    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 10.0)
    if not 0 < seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be above 0 and at most {MAX_SECONDS:g}")
    scale = Scale(seconds=seconds, quick=args.quick)
    attacks = [attack for attack in ATTACKS if not args.only or attack.name in args.only]
    raise_file_limit()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="relayprobe-abuse-") as workdir:
            for attack in attacks:
                rows.append(run_attack(attack, scale, Path(workdir)))
                if not args.json:
                    print(f"abuse: {attack.name} done", file=sys.stderr, flush=True)
    except BenchmarkError as exc:
        print(f"abuse: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("abuse: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
