"""The telnet reflector: whoever connects gets their own port 25 tested, live.

A thin asyncio adapter around the engine, the telnet codec and the PROXY header parser. The
target is the TCP peer of the connection, or the source in a PROXY header from a trusted proxy;
nothing the caller types is used except to notice Ctrl-C.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import structlog

from relayprobe.access import (
    ACCESS_REFUSAL,
    AccessPolicy,
    RateLimiter,
    Refusal,
    parse_network,
    rate_refusal,
)
from relayprobe.canary import CanaryRegistry
from relayprobe.config import Endpoint, Settings
from relayprobe.engine import run_relay_test
from relayprobe.events import Event, Summary
from relayprobe.metrics import Metrics
from relayprobe.proxyproto import ProxyHeaderError, ProxyHeaderParser
from relayprobe.render import MAX_KEPT_CHARS, Transcript, json_result
from relayprobe.telnet import TelnetInput, encode_line

log = structlog.get_logger("relayprobe.server")

BUSY = Refusal("busy", "Too many tests running, try again in a minute")
SHUTDOWN_MESSAGE = ":Service shutting down"
# Past this much unsent output the caller is not reading: end the session.
MAX_OUTPUT_BYTES = 256 * 1024
# Above this, asyncio asks us to pause; a pause longer than the reply timeout ends the session.
WRITE_HIGH_WATER = 64 * 1024
LISTEN_BACKLOG = 4096
SLOW_CLIENT = "client stopped reading"

ResultSink = Callable[[Mapping[str, Any]], None]


class StartupError(OSError):
    """The service cannot start; the message says why and how to fix it."""


def target_address(peer: str) -> str:
    """The address to test for a peer: an IPv4-mapped IPv6 peer is tested as IPv4."""
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class TelnetSession(asyncio.Protocol):
    """One caller: (read a PROXY header,) admit, and stream the relay test of their address."""

    def __init__(self, service: ReflectorService, session_id: int) -> None:
        self.service = service
        self.session_id = session_id
        self.telnet = TelnetInput()
        # The transcript is kept only for the history; without one, keeping it costs for nothing.
        self.transcript = Transcript(max_chars=MAX_KEPT_CHARS if service.on_result else 0)
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.proxy: ProxyHeaderParser | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.end_reason = "finished"
        self.log = log

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername is None:  # the caller reset the connection before we saw it
            transport.close()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.peer = target_address(peername[0])
        self.log = log.bind(session=self.session_id, peer=self.peer)
        if not self.service.settings.proxy_protocol:
            self._admit(self.peer)
        elif self.service.is_trusted_proxy(self.peer):
            self.proxy = ProxyHeaderParser()
            self._start_timer(
                self.service.settings.proxy_timeout, self._drop, "no PROXY header in time"
            )
        else:
            self._drop("untrusted proxy")

    def data_received(self, data: bytes) -> None:
        if self.proxy is not None:
            data = self._read_proxy_header(data)
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
        self._cancel_timer()

    def pause_writing(self) -> None:
        self._start_timer(self.service.settings.reply_timeout, self.end, SLOW_CLIENT)

    def resume_writing(self) -> None:
        self._cancel_timer()

    # Before the test

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY parser; admit the caller once the header is complete."""
        assert self.proxy is not None
        try:
            header = self.proxy.feed(data)
        except ProxyHeaderError as exc:
            self._drop(f"bad PROXY header: {exc}")
            return b""
        if header is None:
            return b""
        self._cancel_timer()
        rest, self.proxy = self.proxy.remainder, None
        if header.source is None:
            # LOCAL / UNKNOWN: the proxy speaking for itself, as in HAProxy's health checks.
            self.log.debug("proxy_local_connection")
            self.end("proxy")
            return b""
        caller = target_address(header.source[0])
        self.log = self.log.bind(caller=caller)
        self._admit(caller)
        return rest

    def _admit(self, caller: str) -> None:
        refusal = self.service.admit(caller)
        if refusal is None:
            self.task = self.service.start_session(self, caller)
            return
        self.log.info("session_refused", reason=refusal.reason, target=caller)
        self.service.metrics.refused(refusal.reason)
        self.write_line(refusal.message)
        self.end(refusal.reason)

    def _drop(self, why: str) -> None:
        """Close a connection whose PROXY header can't be believed; nothing connects out."""
        self.log.warning("proxy_refused", why=why)
        self.service.metrics.refused("proxy")
        self.end("proxy")

    # Output

    def write_line(self, line: str) -> None:
        """Queue a line for the caller; the lines of one loop turn go out in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(encode_line(line))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        transport = self.transport
        if not pending or transport is None or transport.is_closing():
            return
        transport.write(b"".join(pending))
        if transport.get_write_buffer_size() > MAX_OUTPUT_BYTES:
            self.end(SLOW_CLIENT)

    def emit(self, event: Event) -> None:
        for line in self.transcript.add(event):
            self.write_line(line)

    # Ending

    def end(self, reason: str) -> None:
        """Stop the test (its SMTP session gets QUIT) and hang up; the first reason counts."""
        if reason != SLOW_CLIENT:
            self.flush()
        if self.task is not None and not self.task.done() and not self.task.cancelling():
            self.end_reason = reason
            self.task.cancel()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if reason in (SLOW_CLIENT, "proxy"):
                transport.abort()
            else:
                transport.close()

    def _start_timer(self, delay: float, action: Callable[[str], None], reason: str) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(delay, action, reason)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ReflectorService:
    """Listeners, admission (access, session cap, rate limits) and graceful shutdown."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CanaryRegistry | None = None,
        metrics: Metrics | None = None,
        on_result: ResultSink | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.on_result = on_result
        self.options = settings.test_options()
        self.policy = AccessPolicy(allow=settings.allow, deny=settings.deny)
        self.limiter = (
            RateLimiter(
                per_address_interval=settings.rate_address_interval,
                per_prefix=settings.rate_prefix_tests,
                prefix_window=settings.rate_prefix_window,
                ipv4_prefix=settings.rate_ipv4_prefix,
                ipv6_prefix=settings.rate_ipv6_prefix,
                global_per_second=settings.rate_global,
                global_burst=max(1, round(settings.rate_global)),
            )
            if settings.rate_limit
            else None
        )
        self.trusted_proxies = tuple(parse_network(cidr) for cidr in settings.trusted_proxy)
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[int, TelnetSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._shutting_down = False

    async def start(self) -> list[Endpoint]:
        """Listen on every configured endpoint; return the addresses actually bound."""
        loop = asyncio.get_running_loop()
        bound: list[Endpoint] = []

        def new_session() -> TelnetSession:
            return TelnetSession(self, next(self._ids))

        for endpoint in self.settings.listen:
            try:
                server = await loop.create_server(
                    new_session,
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

    def is_trusted_proxy(self, peer: str) -> bool:
        address = ipaddress.ip_address(peer)
        return any(address in network for network in self.trusted_proxies)

    def admit(self, caller: str) -> Refusal | None:
        """Whether `caller` may test now; a rate limit is only charged when the answer is yes."""
        address = ipaddress.ip_address(caller)
        if not self.policy.permits(address):
            return ACCESS_REFUSAL
        if self._shutting_down or len(self.sessions) >= self.settings.max_sessions:
            return BUSY
        if self.limiter is not None:
            decision = self.limiter.check(address)
            if not decision.allowed:
                return rate_refusal(decision)
        return None

    def start_session(self, session: TelnetSession, target: str) -> asyncio.Task[None]:
        self.sessions[session.session_id] = session
        task = asyncio.create_task(self._run_session(session, target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run_session(self, session: TelnetSession, target: str) -> None:
        started = time.monotonic()
        session.log.info("session_start", target=target)
        self.metrics.test_started()
        summary: Summary | None = None
        try:
            with self.metrics.session():
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
            session.end(session.end_reason)
            if session.end_reason == SLOW_CLIENT:
                self.metrics.refused("slow_client")
            self._finished(session, target, summary, time.monotonic() - started)

    def _finished(
        self, session: TelnetSession, target: str, summary: Summary | None, duration: float
    ) -> None:
        if summary is None:
            session.log.info(
                "session_end",
                target=target,
                reason=session.end_reason,
                duration_s=round(duration, 3),
            )
            return
        result = json_result(summary, session.transcript.lines)
        self.metrics.test_finished(
            summary.verdict, duration, [probe.outcome for probe in summary.probes]
        )
        counts = {
            key: result[key] for key in ("accepted", "relayed", "deferred", "rejected", "errors")
        }
        session.log.info(
            "session_end",
            target=target,
            reason="finished",
            verdict=summary.verdict,
            banner=summary.banner,
            duration_s=round(duration, 3),
            **counts,
        )
        if self.on_result is not None:
            self.on_result(result)

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


def bind_advice(endpoint: Endpoint, exc: OSError, *, option: str = "--listen") -> str:
    """One line on why `endpoint` can't be bound and what to do about it."""
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {endpoint}: permission denied; ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE (e.g. AmbientCapabilities= in the systemd unit), "
            f"or give {option} a port above 1023"
        )
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {endpoint}: the address is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {endpoint}: no such address on this machine"
    return f"cannot listen on {endpoint}: {exc.strerror or exc}"
