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
other processes: a busy machine explains a slow run).

With `--door http` the callers are curl-style HTTP clients of the web front door instead
(`GET /`, `Accept: */*`, reading the streamed transcript until the service closes).

Run from the repository root:

    python -m benchmarks.load [--door telnet|http] [--sessions 100 1000] [--repeat R]
                              [--timeout S] [--json]

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
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from relayprobe.fakemx import FakeMailServer, relays_nothing
from relayprobe.frontdoors.core import BUSY
from relayprobe.operations import runtime

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
# The verdict is in the last lines; the whole transcript is not kept.
TAIL_BYTES = 4096
READ_CHUNK = 64 * 1024

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
STARTUP_POLL_S = 0.05
# The fake stops by itself when its parent closes its stdin, or after this long at most.
FAKE_LIFETIME_S = 2 * MAX_RUN_TIMEOUT_S
FAKE_PORT_ATTEMPTS = 5


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


async def _start_fakes(addresses: Sequence[str]) -> tuple[int, list[FakeMailServer]]:
    """One fake per address, all on one port (the first free one on the first address)."""
    for _ in range(FAKE_PORT_ATTEMPTS):
        servers: list[FakeMailServer] = []
        port = 0
        try:
            for address in addresses:
                server = FakeMailServer(relay=relays_nothing)
                servers.append(server)
                port = await server.start(address, port)
        except OSError as exc:
            await asyncio.gather(*(server.stop() for server in servers))
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return port, servers
    raise BenchmarkError(f"no port free on all {len(addresses)} addresses")


async def _serve_fakes(count: int) -> None:
    port, servers = await _start_fakes(caller_addresses(count))
    print(port, flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_stdin_closed(), FAKE_LIFETIME_S)
    await asyncio.gather(*(server.stop() for server in servers))


def fake_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.load fake")
    parser.add_argument("--count", type=int, required=True, help="caller addresses to serve")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_SESSIONS:
        parser.error(f"--count must be between 1 and {MAX_SESSIONS}")
    raise_file_limit()
    runtime.run(_serve_fakes(args.count))
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
def fake_mail_process(count: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The fake mail server process for `count` callers, and the port it listens on."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load", FAKE_COMMAND, "--count", str(count)],
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


@contextlib.contextmanager
def reflector_process(
    mail_port: int, log_path: Path, door: str
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`relayprobe serve` with `door` (telnet or http) on a free 127.0.0.1 port, logging JSON
    to `log_path`."""
    port, other = free_port(), free_port()
    telnet, web = (port, other) if door == "telnet" else (other, port)
    command = [
        sys.executable,
        "-m",
        "relayprobe",
        "serve",
        "--listen",
        f"127.0.0.1:{telnet}",
        "--web-listen",
        f"127.0.0.1:{web}",
        "--target-port",
        str(mail_port),
        "--max-sessions",
        str(MAX_SESSIONS),
        "--no-rate-limit",
        "--no-history",
        "--no-confirm",
        "--log-format",
        "json",
    ]
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
        yield process, port
    finally:
        process.terminate()
        _stop(process)


# The callers


@dataclass(frozen=True, slots=True)
class Call:
    """One caller's session, timed on the benchmark's clock."""

    started: float
    ended: float
    failure: str | None  # None: the transcript ended with a verdict

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
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection(*service, local_addr=(source, 0))
            writer.write(request)
            try:
                tail = await _read_tail(reader)
            finally:
                writer.close()
        failure = transcript_failure(tail)
    except TimeoutError:
        failure = "timeout"
    except ConnectionRefusedError:
        failure = "refused"
    except ConnectionResetError:
        failure = "reset"
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno or 0, "OSError")
    return Call(started, time.perf_counter(), failure)


async def call_all(
    service: tuple[str, int], sources: Sequence[str], timeout: float, request: bytes = b""
) -> list[Call]:
    """Every caller at once, all bounded by one deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    return await asyncio.gather(*(call(service, source, deadline, request) for source in sources))


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
    """The machine's busy CPU time less the three above: kernel work and other processes."""

    @property
    def sessions_per_s(self) -> float:
        return self.verdicts / self.wall_s

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
            "missed_targets": self.missed_targets(),
        }


def percentile(values: Sequence[float], percent: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def megabytes(kib: int) -> float:
    return kib * 1024 / 1e6


def run_once(sessions: int, timeout: float, log_path: Path, door: str = "telnet") -> Run:
    """Fresh fake and service processes, `sessions` callers at once, and what it took."""
    sources = caller_addresses(sessions)
    request = HTTP_REQUEST if door == "http" else b""
    with (
        fake_mail_process(sessions) as (fake, mail_port),
        reflector_process(mail_port, log_path, door) as (service, port),
    ):
        idle_kib = proc_status_kib(service.pid, "VmRSS")
        service_cpu, fake_cpu = cpu_seconds(service.pid), cpu_seconds(fake.pid)
        callers_cpu, machine_busy = time.process_time(), machine_busy_seconds()
        calls = runtime.run(call_all(("127.0.0.1", port), sources, timeout, request))
        callers_cpu = time.process_time() - callers_cpu
        machine_busy = machine_busy_seconds() - machine_busy
        service_cpu = cpu_seconds(service.pid) - service_cpu
        fake_cpu = cpu_seconds(fake.pid) - fake_cpu
        peak_kib = proc_status_kib(service.pid, "VmHWM")
    seconds = [one.seconds for one in calls]
    return Run(
        sessions=sessions,
        verdicts=sum(1 for one in calls if one.failure is None),
        failures=Counter(one.failure for one in calls if one.failure is not None),
        wall_s=max(one.ended for one in calls) - min(one.started for one in calls),
        p50_s=percentile(seconds, 50),
        p99_s=percentile(seconds, 99),
        idle_rss_mb=megabytes(idle_kib),
        peak_rss_mb=megabytes(peak_kib),
        service_cpu_s=service_cpu,
        fake_cpu_s=fake_cpu,
        callers_cpu_s=callers_cpu,
        other_cpu_s=machine_busy - service_cpu - fake_cpu - callers_cpu,
    )


def benchmark(
    session_counts: Sequence[int], repeat: int, timeout: float, door: str = "telnet"
) -> list[Run]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="relayprobe-load-") as workdir:
        for _ in range(repeat):
            for sessions in session_counts:
                runs.append(run_once(sessions, timeout, Path(workdir, "service.log"), door))
    return runs


@dataclass(frozen=True, slots=True)
class Summary:
    """The runs of one session count: medians, and the worst of each figure."""

    sessions: int
    runs: int
    median_sessions_per_s: float
    worst_sessions_per_s: float
    median_p50_s: float
    worst_p99_s: float
    worst_peak_rss_mb: float
    runs_meeting_targets: int

    def as_json(self) -> dict[str, object]:
        return {
            "sessions": self.sessions,
            "runs": self.runs,
            "median_sessions_per_s": round(self.median_sessions_per_s, 1),
            "worst_sessions_per_s": round(self.worst_sessions_per_s, 1),
            "median_p50_s": round(self.median_p50_s, 3),
            "worst_p99_s": round(self.worst_p99_s, 3),
            "worst_peak_rss_mb": round(self.worst_peak_rss_mb, 1),
            "runs_meeting_targets": self.runs_meeting_targets,
        }


def summarize(runs: Sequence[Run]) -> list[Summary]:
    summaries = []
    for sessions in dict.fromkeys(run.sessions for run in runs):
        mine = [run for run in runs if run.sessions == sessions]
        rates = [run.sessions_per_s for run in mine]
        summaries.append(
            Summary(
                sessions=sessions,
                runs=len(mine),
                median_sessions_per_s=statistics.median(rates),
                worst_sessions_per_s=min(rates),
                median_p50_s=statistics.median(run.p50_s for run in mine),
                worst_p99_s=max(run.p99_s for run in mine),
                worst_peak_rss_mb=max(run.peak_rss_mb for run in mine),
                runs_meeting_targets=sum(1 for run in mine if not run.missed_targets()),
            )
        )
    return summaries


def print_table(runs: Sequence[Run]) -> None:
    print(
        f"{'sessions':>8} {'verdicts':>8} {'wall s':>7} {'sess/s':>7} {'p50 s':>6} {'p99 s':>6} "
        f"{'idle MB':>7} {'peak MB':>7}  {'CPU s service/fake/callers/other':<32}  failures"
    )
    for run in runs:
        cpu = (
            f"{run.service_cpu_s:.1f}/{run.fake_cpu_s:.1f}/{run.callers_cpu_s:.1f}"
            f"/{run.other_cpu_s:.1f}"
        )
        failures = ", ".join(f"{kind} {count}" for kind, count in sorted(run.failures.items()))
        print(
            f"{run.sessions:>8} {run.verdicts:>8} {run.wall_s:>7.2f} {run.sessions_per_s:>7.0f} "
            f"{run.p50_s:>6.2f} {run.p99_s:>6.2f} {run.idle_rss_mb:>7.1f} "
            f"{run.peak_rss_mb:>7.1f}  {cpu:<32}  {failures or 'none'}"
        )
    for run in runs:
        missed = run.missed_targets()
        if missed:
            print(f"{run.sessions} sessions missed targets: {'; '.join(missed)}")
    for summary in summarize(runs):
        print(
            f"{summary.sessions} sessions, {summary.runs} runs: "
            f"{summary.median_sessions_per_s:.0f} sessions/s median "
            f"({summary.worst_sessions_per_s:.0f} worst), p50 {summary.median_p50_s:.2f} s median, "
            f"p99 {summary.worst_p99_s:.2f} s worst, peak RSS {summary.worst_peak_rss_mb:.1f} MB "
            f"worst; targets met in {summary.runs_meeting_targets} of {summary.runs} runs"
        )


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
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(arguments)
    if not all(1 <= sessions <= MAX_SESSIONS for sessions in args.sessions):
        parser.error(f"--sessions must be between 1 and {MAX_SESSIONS}")
    if not 1 <= args.repeat <= MAX_REPEAT:
        parser.error(f"--repeat must be between 1 and {MAX_REPEAT}")
    if not 0 < args.timeout <= MAX_RUN_TIMEOUT_S:
        parser.error(f"--timeout must be above 0 and at most {MAX_RUN_TIMEOUT_S:g}")
    raise_file_limit()
    try:
        runs = benchmark(args.sessions, args.repeat, args.timeout, args.door)
    except BenchmarkError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 1
    if args.json:
        report = {
            "runs": [run.as_json() for run in runs],
            "summaries": [summary.as_json() for summary in summarize(runs)],
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
