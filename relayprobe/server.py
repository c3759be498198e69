"""The telnet reflector: whoever connects gets their own port 25 tested, live.

A thin asyncio adapter around the engine, the telnet codec and the PROXY header parser. The
target is the TCP peer of the connection, or the source in a PROXY header from a trusted proxy;
nothing the caller types is used except to notice Ctrl-C.
"""

from __future__ import annotations

import asyncio
import errno
import functools
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
    TokenBucket,
    parse_network,
    rate_refusal,
)
from relayprobe.canary import CanaryRegistry
from relayprobe.config import Endpoint, Settings
from relayprobe.engine import run_relay_test
from relayprobe.events import Event, Received, Summary
from relayprobe.metrics import Metrics
from relayprobe.proxyproto import ProxyHeaderError, ProxyHeaderParser
from relayprobe.render import MAX_KEPT_CHARS, Transcript, json_result
from relayprobe.tcpstate import PeerState, limit_send_queue, peer_state
from relayprobe.telnet import NO_OPERATION, TelnetInput, encode_line

log = structlog.get_logger("relayprobe.server")

BUSY = Refusal("busy", "Too many tests running, try again in a minute")
SHUTDOWN_MESSAGE = ":Service shutting down"
# Above this, asyncio asks us to pause; a pause longer than the write timeout ends the session.
WRITE_HIGH_WATER = 64 * 1024
# What the kernel may hold for a caller: small, so that our own output cap is what counts.
CALLER_SEND_BUFFER = 64 * 1024
LISTEN_BACKLOG = 4096
# While a caller that has sent FIN is silent, how often to check that it is still there.
CALLER_CHECK_INTERVAL = 0.25
CALLER_FIRST_CHECK = 0.01
# How long a probe waits for a caller that has sent FIN to acknowledge what we wrote.
CALLER_CHECK_TIMEOUT = 1.0
SLOW_CLIENT = "client stopped reading"
CLIENT_CLOSED = "client closed"

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
    """One caller: (read a PROXY header,) admit, and stream the relay test of their address.

    A FIN from the caller only means it has nothing more to say (`nc -N`, scripts): the test
    goes on. The caller is gone when a write fails or the kernel sees a reset; after a FIN we
    write an invisible telnet NOP now and then so that a caller who hung up is noticed within a
    second, and before each probe we wait until the caller has acknowledged what we sent.
    """

    def __init__(self, service: ReflectorService, session_id: int) -> None:
        self.service = service
        self.session_id = session_id
        settings = service.settings
        self.telnet = TelnetInput()
        self.input_budget = TokenBucket(
            rate=settings.caller_input_rate,
            capacity=settings.caller_input_bytes,
            now=time.monotonic(),
        )
        # The transcript is kept only for the history; without one, keeping it costs for nothing.
        self.transcript = Transcript(max_chars=MAX_KEPT_CHARS if service.on_result else 0)
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.proxy: ProxyHeaderParser | None = None
        self.task: asyncio.Task[Summary] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watch: asyncio.TimerHandle | None = None
        self.end_reason: str | None = None
        self.ignoring_input = False
        self.heard_server = False
        """Whether the tested server has said anything yet: until then the test cost little."""
        self.caller_silent = False
        """The caller sent FIN, or we stopped reading: only writes can tell us it has gone."""
        self.written_since_check = False
        """Whether anything went out since the caller was last checked: if it has gone, what
        we wrote is answered with a reset; if nothing went out, a NOP must."""
        self.log = log

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername is None:  # the caller reset the connection before we saw it
            transport.close()
            return
        settings = self.service.settings
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        limit_send_queue(
            transport.get_extra_info("socket"),
            buffer_bytes=CALLER_SEND_BUFFER,
            stalled_after=settings.caller_write_timeout,
        )
        self.peer = target_address(peername[0])
        self.log = log.bind(session=self.session_id, peer=self.peer)
        if not settings.proxy_protocol:
            self._admit(self.peer)
        elif self.service.is_trusted_proxy(self.peer):
            self.proxy = ProxyHeaderParser()
            self._start_timer(settings.proxy_timeout, self._drop, "no PROXY header in time")
        else:
            self._drop("untrusted proxy")

    def data_received(self, data: bytes) -> None:
        if self.proxy is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        if self.ignoring_input:
            return
        if self.input_budget.wait(time.monotonic(), len(data)) > 0:
            self._stop_reading()
            return
        self.input_budget.take(len(data))
        result = self.telnet.feed(data)
        if result.reply:
            self._queue(result.reply)
        if result.interrupted:
            self.end("interrupted")

    def eof_received(self) -> bool:
        if self.task is None or self.task.done():
            self.end(CLIENT_CLOSED)
            return False
        self.log.debug("caller_half_closed")
        self._watch_caller()
        return True  # keep writing: a half-closed caller still reads

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(CLIENT_CLOSED)
        self._cancel_timer()
        if self.watch is not None:
            self.watch.cancel()

    def pause_writing(self) -> None:
        timeout = self.service.settings.caller_write_timeout
        self._start_timer(timeout, self.end, SLOW_CLIENT)

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

    # The caller's input

    def _stop_reading(self) -> None:
        """The caller sent more than the service will read: read nothing more, say so once."""
        assert self.transport is not None
        self.transport.pause_reading()
        self.ignoring_input = True
        self.log.info("caller_input_ignored")
        limit = self.service.settings.caller_input_bytes
        self.write_line(f":Ignoring your input from now on (over {limit} bytes); hang up to stop")
        self._watch_caller()

    def _watch_caller(self) -> None:
        """Start checking, now and every CALLER_CHECK_INTERVAL, that the caller is still there.

        The first check comes CALLER_FIRST_CHECK after the first write: a caller who hung up
        answers that write with a reset within a round trip, before the test sends much more.
        """
        if self.caller_silent:
            return
        self.caller_silent = True
        self._check_caller(next_in=CALLER_FIRST_CHECK)

    def _check_caller(self, next_in: float = CALLER_CHECK_INTERVAL) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if peer_state(transport.get_extra_info("socket")) is PeerState.GONE:
            self.end(CLIENT_CLOSED)
            return
        self._write_something()
        self.watch = asyncio.get_running_loop().call_later(next_in, self._check_caller)

    def _write_something(self) -> None:
        """Make sure something went out since the last check; a gone caller resets it."""
        self.flush()
        if not self.written_since_check:
            self.pending.append(NO_OPERATION)
            self.flush()
        self.written_since_check = False

    async def caller_present(self) -> None:
        """Before each probe and test message: once the caller has gone quiet, wait (at most
        CALLER_CHECK_TIMEOUT) until it has acknowledged what we sent, so that nothing new starts
        for a caller who hung up."""
        transport = self.transport
        if not self.caller_silent or transport is None:
            return
        self._write_something()
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + CALLER_CHECK_TIMEOUT
        delay = 0.001
        while time.monotonic() < deadline:
            state = peer_state(sock)
            if state is PeerState.GONE or transport.is_closing():
                self.end(CLIENT_CLOSED)
                raise asyncio.CancelledError
            if state is PeerState.UNKNOWN or (
                state is PeerState.PRESENT and not transport.get_write_buffer_size()
            ):
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, CALLER_CHECK_INTERVAL)

    # Output

    def write_line(self, line: str) -> None:
        """Queue a line for the caller; the lines of one loop turn go out in one write."""
        self._queue(encode_line(line))

    def _queue(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        transport = self.transport
        if not pending or transport is None or transport.is_closing():
            return
        transport.write(b"".join(pending))
        self.written_since_check = True
        if transport.get_write_buffer_size() > self.service.settings.caller_output_bytes:
            self.end(SLOW_CLIENT)

    def emit(self, event: Event) -> None:
        if isinstance(event, Received):
            self.heard_server = True
        for line in self.transcript.add(event):
            self.write_line(line)

    # Ending

    def end(self, reason: str) -> None:
        """Stop the test (its SMTP session gets QUIT) and hang up; the first reason counts."""
        if self.end_reason is None:
            self.end_reason = reason
        if reason != SLOW_CLIENT:
            self.flush()
        if self.task is not None and not self.task.done():
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
        self.tasks: set[asyncio.Task[Summary]] = set()
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

    def start_session(self, session: TelnetSession, target: str) -> asyncio.Task[Summary]:
        """Run the test of `target` for `session`.

        The session is counted from here to the task's done-callback, never from inside the
        task: a caller who hangs up at once gets the task cancelled before its first step, and
        a `finally` in it would never run.
        """
        self.sessions[session.session_id] = session
        self.metrics.session_opened()
        self.metrics.test_started()
        session.log.info("session_start", target=target)
        task = asyncio.create_task(self._run_test(session, target))
        self.tasks.add(task)
        task.add_done_callback(
            functools.partial(self._session_done, session, target, time.monotonic())
        )
        return task

    async def _run_test(self, session: TelnetSession, target: str) -> Summary:
        for line in self.settings.motd.splitlines():
            session.write_line(line)
        return await run_relay_test(
            target,
            self.options,
            session.emit,
            registry=self.registry,
            checkpoint=session.caller_present,
        )

    def _session_done(
        self, session: TelnetSession, target: str, started: float, task: asyncio.Task[Summary]
    ) -> None:
        self.tasks.discard(task)
        del self.sessions[session.session_id]
        self.metrics.session_closed()
        summary: Summary | None = None
        if task.cancelled():
            if not session.heard_server and self.limiter is not None:
                self.limiter.refund_global()
        elif (error := task.exception()) is not None:
            session.end_reason = "internal error"
            session.log.error("session_failed", target=target, exc_info=error)
            session.write_line(":Internal error; the test was stopped")
        else:
            summary = task.result()
        reason = session.end_reason or "finished"
        session.end(reason)
        if reason == SLOW_CLIENT:
            self.metrics.refused("slow_client")
        duration = time.monotonic() - started
        if summary is None:
            session.log.info(
                "session_end", target=target, reason=reason, duration_s=round(duration, 3)
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
