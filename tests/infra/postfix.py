"""The real Postfix instances of tests/infra/postfix.sh, for pytest.

Four instances on loopback aliases: a closed one (Debian's stock relay restrictions, relaying
deferred with 454), an open relay that hands mail for TEST_DOMAIN to relayprobe's canary sink,
and a TLS pair: tls-open requires STARTTLS before MAIL (530 until then) and then relays like the
open one; tls-closed offers STARTTLS and is closed. Each TLS instance presents a self-signed
certificate whose CN is its hostname. All keep Postfix's stock error limits; `error_limit_hits`
reads their logs so tests can prove a client stayed under them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOSED_HOST = "127.0.0.2"
OPEN_HOST = "127.0.0.3"
TLS_OPEN_HOST = "127.0.0.4"
TLS_CLOSED_HOST = "127.0.0.5"
SMTP_PORT = 25
CLOSED_HOSTNAME = "closed.relayprobe.test"
OPEN_HOSTNAME = "open.relayprobe.test"
# Also the CN (and the only DNS name) of the instance's self-signed certificate.
TLS_OPEN_HOSTNAME = "tls-open.relayprobe.test"
TLS_CLOSED_HOSTNAME = "tls-closed.relayprobe.test"
# Self-signed certificates (PEM) that postfix.sh generates; valid CERT_DAYS days from creation.
TLS_OPEN_CERT = Path("/etc/postfix-tls-open/tls-cert.pem")
TLS_CLOSED_CERT = Path("/etc/postfix-tls-closed/tls-cert.pem")
CERT_DAYS = 365
SINK_HOST = "127.0.0.1"
SINK_PORT = 2525
TEST_DOMAIN = "relaytest.invalid"

# Postfix's stock smtpd_soft_error_limit, which postfix.sh leaves alone: from this many
# errors on, every reply in the session is delayed by smtpd_error_sleep_time (1 s).
SOFT_ERROR_LIMIT = 10

POSTFIX_SH = Path(__file__).with_name("postfix.sh")
# Instance name -> the address its smtpd listens on (port SMTP_PORT).
HOSTS = {
    "closed": CLOSED_HOST,
    "open": OPEN_HOST,
    "tls-open": TLS_OPEN_HOST,
    "tls-closed": TLS_CLOSED_HOST,
}
LOGS = {name: Path(f"/var/log/postfix-{name}.log") for name in HOSTS}

_START_TIMEOUT_S = 120.0
_BANNER_TIMEOUT_S = 2.0
_SETTLE_POLL_S = 0.05
# A test's log excerpt is small; this only guards against reading a runaway log whole.
_MAX_LOG_READ = 64 * 1024 * 1024

_SMTPD_LINE = re.compile(r"/smtpd\[(?P<pid>\d+)\]: (?P<event>.*)$")
_COMMANDS = re.compile(r" commands=(?P<ok>\d+)(?:/(?P<total>\d+))?$")


class PostfixStartError(RuntimeError):
    """tests/infra/postfix.sh start failed; the message carries its output."""


@dataclass(frozen=True, slots=True)
class ErrorLimitHits:
    """Sessions of one instance that ran into Postfix's error limits."""

    tarpitted: int  # reached smtpd_soft_error_limit: every later reply delayed
    dropped: int  # cut off at smtpd_hard_error_limit ("too many errors")


NO_HITS = ErrorLimitHits(tarpitted=0, dropped=0)


@dataclass(frozen=True, slots=True)
class SmtpdLogTally:
    """What smtpd log lines say about the sessions in them."""

    hits: ErrorLimitHits
    unfinished_sessions: int  # connected but not yet disconnected


@dataclass(frozen=True, slots=True)
class LogMarker:
    """Where each instance's log ended when the marker was taken."""

    offsets: tuple[tuple[str, int], ...]


def postfix_available() -> str | None:
    """Why tests needing the instances must skip, or None when they can run.

    None means the instances answer or this process may start them (ensure_started).
    """
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    if shutil.which("postfix", path=search_path) is None:
        return "Postfix is not installed (run .ci/system-packages as root)"
    if all_answer():
        return None
    if os.geteuid() != 0:
        return f"the Postfix test instances are not running; as root run: {POSTFIX_SH} start"
    return None


@functools.cache
def ensure_started() -> None:
    """Run `postfix.sh start` once per test run; it returns when all instances answer."""
    try:
        completed = subprocess.run(
            ["bash", str(POSTFIX_SH), "start"],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise PostfixStartError(f"{POSTFIX_SH} start took over {_START_TIMEOUT_S:g} s") from exc
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip()
        raise PostfixStartError(f"{POSTFIX_SH} start exited {completed.returncode}: {output}")


def answers(host: str, port: int = SMTP_PORT) -> bool:
    """Whether host:port greets with a 220 within a couple of seconds."""
    try:
        with socket.create_connection((host, port), timeout=_BANNER_TIMEOUT_S) as connection:
            return connection.recv(3) == b"220"
    except OSError:
        return False


def all_answer() -> bool:
    """Whether every instance greets with a 220."""
    return all(answers(host) for host in HOSTS.values())


def log_marker() -> LogMarker:
    """The current end of each instance's log, to count what happens after it."""
    return LogMarker(offsets=tuple((name, _size(path)) for name, path in LOGS.items()))


def error_limit_hits(since: LogMarker, *, timeout: float = 5.0) -> dict[str, ErrorLimitHits]:
    """Sessions per instance (the keys of HOSTS) that hit an error limit after `since`.

    Postfix logs a session's statistics when it ends, a moment after the client hangs up,
    so this waits (up to `timeout` seconds) until every session begun since the marker
    has ended; TimeoutError if one is still open then.
    """
    deadline = time.monotonic() + timeout
    offsets = dict(since.offsets)
    while True:
        tallies = {
            name: tally_smtpd_log(_lines_after(path, offsets.get(name, 0)))
            for name, path in LOGS.items()
        }
        unfinished = {name: t.unfinished_sessions for name, t in tallies.items()}
        if not any(unfinished.values()):
            return {name: tally.hits for name, tally in tallies.items()}
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Postfix sessions still open after {timeout:g} s: {unfinished}")
        time.sleep(_SETTLE_POLL_S)


def tally_smtpd_log(lines: Iterable[str]) -> SmtpdLogTally:
    """Count error-limit hits in Postfix log lines (those of one instance, in order).

    A session's error count is its failed commands: the total minus the successful ones
    in the "disconnect from ... commands=OK/TOTAL" line that ends it.
    """
    open_sessions: set[str] = set()
    tarpitted = dropped = 0
    for line in lines:
        match = _SMTPD_LINE.search(line)
        if match is None:
            continue
        pid, event = match["pid"], match["event"]
        if event.startswith("connect from "):
            open_sessions.add(pid)
        elif event.startswith("too many errors after "):
            dropped += 1
        elif event.startswith("disconnect from "):
            open_sessions.discard(pid)
            commands = _COMMANDS.search(event)
            if commands is not None and commands["total"] is not None:
                failed = int(commands["total"]) - int(commands["ok"])
                if failed >= SOFT_ERROR_LIMIT:
                    tarpitted += 1
    return SmtpdLogTally(
        hits=ErrorLimitHits(tarpitted=tarpitted, dropped=dropped),
        unfinished_sessions=len(open_sessions),
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lines_after(path: Path, offset: int) -> list[str]:
    """Complete lines of `path` from byte `offset` (from the start if the log was replaced)."""
    try:
        with path.open("rb") as log:
            if offset > os.fstat(log.fileno()).st_size:
                offset = 0
            log.seek(offset)
            data = log.read(_MAX_LOG_READ)
    except FileNotFoundError:
        return []
    complete, _, _ = data.rpartition(b"\n")
    return complete.decode("utf-8", errors="replace").splitlines()


def stop() -> None:
    """Stop all instances (`postfix.sh stop`)."""
    subprocess.run(
        ["bash", str(POSTFIX_SH), "stop"],
        capture_output=True,
        timeout=_START_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
