"""The telnet reflector: whoever connects gets their own port 25 tested, live.

A thin asyncio adapter around the engine and the telnet codec. The target is always the TCP peer
of the connection; nothing the caller types is used except to notice Ctrl-C.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog

from relayprobe.canary import CanaryRegistry
from relayprobe.config import Endpoint, Settings
from relayprobe.engine import run_relay_test
from relayprobe.events import Event, Outcome, Summary
from relayprobe.render import text_lines
from relayprobe.telnet import TelnetInput, encode_line

log = structlog.get_logger("relayprobe.server")

BUSY_MESSAGE = "Too many tests running, try again in a minute"
SHUTDOWN_MESSAGE = ":Service shutting down"
# Past this much unsent output the caller is not reading: end the session.
MAX_OUTPUT_BYTES = 256 * 1024
# Above this, asyncio asks us to pause; a pause longer than the reply timeout ends the session.
WRITE_HIGH_WATER = 64 * 1024
READ_CHUNK = 4096
LISTEN_BACKLOG = 4096


class StartupError(OSError):
    """The service cannot start; the message says why and how to fix it."""


def target_address(peer: str) -> str:
    """The address to test for a peer: an IPv4-mapped IPv6 peer is tested as IPv4."""
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    reason: str
    summary: Summary | None


class TelnetSession(asyncio.Protocol):
    """One caller: stream the relay test of their address into their terminal."""

    def __init__(self, service: ReflectorService, session_id: int) -> None:
        self.service = service
        self.session_id = session_id
        self.telnet = TelnetInput()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.end_reason = "finished"
        self.log = log

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")[0]
        self.log = log.bind(session=self.session_id, peer=peer)
        if not self.service.has_room():
            self.service.refused("busy")
            self.log.info("session_refused", reason="busy")
            self.write_line(BUSY_MESSAGE)
            transport.close()
            return
        self.task = self.service.start_session(self, target_address(peer))

    def data_received(self, data: bytes) -> None:
        result = self.telnet.feed(data)
        if result.reply and self.transport is not None:
            self.transport.write(result.reply)
        if result.interrupted:
            self.end("interrupted")

    def eof_received(self) -> bool:
        self.end("client closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.end("client closed")
        self._cancel_stall_timer()

    def pause_writing(self) -> None:
        self.stall_timer = asyncio.get_running_loop().call_later(
            self.service.settings.reply_timeout, self.end, "client stopped reading"
        )

    def resume_writing(self) -> None:
        self._cancel_stall_timer()

    # Output

    def write_line(self, line: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(encode_line(line))
        if transport.get_write_buffer_size() > MAX_OUTPUT_BYTES:
            self.end("client stopped reading")

    def emit(self, event: Event) -> None:
        for line in text_lines(event):
            self.write_line(line)

    # Ending

    def end(self, reason: str) -> None:
        """Stop the test (its SMTP session gets QUIT) and hang up; the first reason counts."""
        if self.task is not None and not self.task.done() and not self.task.cancelling():
            self.end_reason = reason
            self.task.cancel()
        if self.transport is not None and not self.transport.is_closing():
            if reason == "client stopped reading":
                self.transport.abort()
            else:
                self.transport.close()

    def _cancel_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None


class ReflectorService:
    """Listeners, the session cap and graceful shutdown."""

    def __init__(self, settings: Settings, *, registry: CanaryRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.options = settings.test_options()
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[int, TelnetSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.refusals: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._shutting_down = False

    async def start(self) -> list[Endpoint]:
        """Listen on every configured endpoint; return the addresses actually bound."""
        loop = asyncio.get_running_loop()
        bound: list[Endpoint] = []
        for endpoint in self.settings.listen:
            factory: Callable[[], TelnetSession] = lambda: TelnetSession(self, next(self._ids))  # noqa: E731
            try:
                server = await loop.create_server(
                    factory,
                    endpoint.host,
                    endpoint.port,
                    backlog=LISTEN_BACKLOG,
                    reuse_address=True,
                )
            except OSError as exc:
                await self.close_listeners()
                raise StartupError(exc.errno, bind_advice(endpoint, exc)) from None
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append(Endpoint(host, port))
        return bound

    def has_room(self) -> bool:
        return not self._shutting_down and len(self.sessions) < self.settings.max_sessions

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def start_session(self, session: TelnetSession, target: str) -> asyncio.Task[None]:
        self.sessions[session.session_id] = session
        task = asyncio.create_task(self._run_session(session, target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run_session(self, session: TelnetSession, target: str) -> None:
        started = time.monotonic()
        session.log.info("session_start", target=target)
        summary: Summary | None = None
        try:
            if self.settings.motd:
                for line in self.settings.motd.splitlines():
                    session.write_line(line)
            summary = await run_relay_test(
                target, self.options, session.emit, registry=self.registry
            )
        except asyncio.CancelledError:
            pass
        except Exception:
            session.end_reason = "internal error"
            session.log.exception("session_failed", target=target)
            session.write_line(":Internal error; the test was stopped")
        finally:
            del self.sessions[session.session_id]
            if session.transport is not None and not session.transport.is_closing():
                session.transport.close()
            _log_end(session, target, summary, time.monotonic() - started)

    async def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    async def shutdown(self, *, grace: float = 3.0) -> None:
        """Stop accepting, tell running callers, QUIT their SMTP sessions and wait a little."""
        self._shutting_down = True
        for server in self.servers:
            server.close()
        for session in list(self.sessions.values()):
            session.write_line(SHUTDOWN_MESSAGE)
            session.end("service shutting down")
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace)
        await self.close_listeners()


def _log_end(session: TelnetSession, target: str, summary: Summary | None, duration: float) -> None:
    if summary is None:
        session.log.info(
            "session_end", target=target, reason=session.end_reason, duration_s=round(duration, 3)
        )
        return
    counts = {outcome.value: 0 for outcome in Outcome}
    for probe in summary.probes:
        counts[probe.outcome.value] += 1
    session.log.info(
        "session_end",
        target=target,
        reason="finished",
        verdict=summary.verdict,
        banner=summary.banner,
        duration_s=round(duration, 3),
        **counts,
    )


def bind_advice(endpoint: Endpoint, exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {endpoint}: permission denied; ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE (e.g. AmbientCapabilities= in the systemd unit), "
            "or listen on a higher port with --listen 0.0.0.0:2323"
        )
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {endpoint}: the address is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {endpoint}: no such address on this machine"
    return f"cannot listen on {endpoint}: {exc.strerror or exc}"
