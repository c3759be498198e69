"""The telnet reflector: whoever connects gets their own port 25 tested, live.

A thin asyncio adapter around the engine, the telnet codec and the PROXY header parser. The
target is the TCP peer of the connection, or the source in a PROXY header from a trusted proxy;
nothing the caller types is used except to notice Ctrl-C.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import structlog

from relayprobe.frontdoors.access import TokenBucket
from relayprobe.frontdoors.addresses import IPAddress, peer_address
from relayprobe.frontdoors.core import (
    EndReason,
    RunningTest,
    SessionCore,
    Ticket,
)
from relayprobe.frontdoors.proxyproto import ProxyHeaderParser, read_proxy_header
from relayprobe.frontdoors.tcpstate import (
    LISTEN_BACKLOG,
    PeerState,
    limit_send_queue,
    peer_state,
)
from relayprobe.frontdoors.telnetcodec import NO_OPERATION, TelnetInput, encode_lines
from relayprobe.operations.config import Endpoint
from relayprobe.operations.startup import StartupError, bind_advice
from relayprobe.relaytest.events import Event
from relayprobe.reports.result import TestResult

log = structlog.get_logger("relayprobe.frontdoors.telnet")

SHUTDOWN_MESSAGE = ":Service shutting down"
# Above this, asyncio asks us to pause; a pause longer than the write timeout ends the session.
WRITE_HIGH_WATER = 64 * 1024
# What the kernel may hold for a caller: small, so that our own output cap is what counts.
CALLER_SEND_BUFFER = 64 * 1024
# Lines wait this long for the lines after them, to go out in one write: a fast server's replies
# come in a few milliseconds each, and every write costs a system call here and a wake-up at the
# caller's end. A person sees no delay this short.
OUTPUT_DELAY_S = 0.02
# While a caller that has sent FIN is silent, how often to check that it is still there.
CALLER_CHECK_INTERVAL = 0.25
CALLER_FIRST_CHECK = 0.01
# How long a probe waits for a caller that has sent FIN to acknowledge what we wrote.
CALLER_CHECK_TIMEOUT = 1.0


class TelnetSession(asyncio.Protocol):
    """One caller: (read a PROXY header,) admit, and stream the relay test of their address.

    A FIN from the caller only means it has nothing more to say (`nc -N`, scripts): the test
    goes on. The caller is gone when a write fails or the kernel sees a reset; after a FIN we
    write an invisible telnet NOP now and then so that a caller who hung up is noticed within a
    second, and before each probe we wait until the caller has acknowledged what we sent.
    """

    def __init__(self, service: ReflectorService) -> None:
        self.service = service
        self.core = service.core
        self.session_id = self.core.next_session_id()
        settings = self.core.settings
        self.telnet = TelnetInput()
        self.input_budget = TokenBucket(
            rate=settings.caller_input_rate,
            capacity=settings.caller_input_bytes,
            now=time.monotonic(),
        )
        # Once: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.pending: list[bytes] = []
        self.pending_lines: list[str] = []
        """Transcript lines queued after the last of `pending`: encoded together, in order, when
        other output follows or at the flush."""
        self.flush_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.proxy: ProxyHeaderParser | None = None
        self.running: RunningTest | None = None
        self.admitting: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watch: asyncio.TimerHandle | None = None
        self.ignoring_input = False
        self.caller_silent = False
        """The caller sent FIN, or we stopped reading: only writes can tell us it has gone."""
        self.written_since_check = False
        """Whether anything went out since the caller was last checked: if it has gone, what
        we wrote is answered with a reset; if nothing went out, a NOP must."""
        self.log = log.bind(session=self.session_id)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername is None:  # the caller reset the connection before we saw it
            transport.close()
            return
        settings = self.core.settings
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        limit_send_queue(
            transport.get_extra_info("socket"),
            buffer_bytes=CALLER_SEND_BUFFER,
            stalled_after=settings.caller_write_timeout,
        )
        peer = peer_address(peername[0])
        self.log = self.log.bind(peer=str(peer))
        if not settings.proxy_protocol:
            self._admit(peer)
        elif self.core.is_trusted_proxy(peer):
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
            self.end(EndReason.INTERRUPTED)

    def eof_received(self) -> bool:
        testing = self.admitting is not None or self.running is not None
        if not testing or (self.running is not None and self.running.result is not None):
            self.end(EndReason.CLIENT_CLOSED)
            return False
        self.log.debug("caller_half_closed")
        self._watch_caller()
        return True  # keep writing: a half-closed caller still reads

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(EndReason.CLIENT_CLOSED)
        self._cancel_timer()
        if self.watch is not None:
            self.watch.cancel()

    def pause_writing(self) -> None:
        timeout = self.core.settings.caller_write_timeout
        self._start_timer(timeout, self.end, EndReason.SLOW_CLIENT)

    def resume_writing(self) -> None:
        self._cancel_timer()

    # Before the test

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY parser; admit the caller once the header is complete."""
        assert self.proxy is not None
        read = read_proxy_header(self.proxy, data)
        if not read.complete:
            return b""
        self._cancel_timer()
        self.proxy = None
        if read.error is not None:
            self._drop(f"bad PROXY header: {read.error}")
        elif read.source is None:
            self.log.debug("proxy_local_connection")
            self._close()
        else:
            self.log = self.log.bind(caller=str(read.source))
            self._admit(read.source)
            return read.rest
        return b""

    def _admit(self, caller: IPAddress) -> None:
        # A shared rate limiter answers after a round trip: admission is a task of its own,
        # which a caller who hangs up meanwhile cancels.
        self.admitting = asyncio.create_task(self._admission(caller))

    async def _admission(self, caller: IPAddress) -> None:
        ticket = await self.core.admit(caller, door="telnet", session_id=self.session_id)
        self.admitting = None
        if not isinstance(ticket, Ticket):
            self.write_line(ticket.message)
            self._close()
            return
        self.running = self.core.start(
            ticket, on_lines=self.show, checkpoint=self.caller_present, on_done=self._test_done
        )
        self.service.sessions[self.session_id] = self

    def _drop(self, why: str) -> None:
        """Close a connection whose PROXY header can't be believed; nothing connects out."""
        self.log.warning("proxy_refused", why=why)
        self.core.metrics.refused("proxy")
        self._close(abort=True)

    # The caller's input

    def _stop_reading(self) -> None:
        """The caller sent more than the service will read: read nothing more, say so once."""
        assert self.transport is not None
        self.transport.pause_reading()
        self.ignoring_input = True
        self.log.info("caller_input_ignored")
        limit = self.core.settings.caller_input_bytes
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
            self.end(EndReason.CLIENT_CLOSED)
            return
        self._write_something()
        self.watch = self.loop.call_later(next_in, self._check_caller)

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
                self.end(EndReason.CLIENT_CLOSED)
                raise asyncio.CancelledError
            if state is PeerState.UNKNOWN or (
                state is PeerState.PRESENT and not transport.get_write_buffer_size()
            ):
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, CALLER_CHECK_INTERVAL)

    # Output

    def write_line(self, line: str) -> None:
        if self._output_open():
            self.pending_lines.append(line)

    def show(self, event: Event, lines: tuple[str, ...]) -> None:
        if lines and self._output_open():
            self.pending_lines.extend(lines)

    def _queue(self, data: bytes) -> None:
        if self._output_open():
            self._encode_pending_lines()
            self.pending.append(data)

    def _output_open(self) -> bool:
        """Whether output can still go out; if so, it goes out within OUTPUT_DELAY_S, in one
        write with whatever else comes by then."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.flush_timer is None:
            self.flush_timer = self.loop.call_later(OUTPUT_DELAY_S, self.flush)
        return True

    def _encode_pending_lines(self) -> None:
        lines, self.pending_lines = self.pending_lines, []
        if lines:
            self.pending.append(encode_lines(lines))

    def flush(self) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        self._encode_pending_lines()
        pending, self.pending = self.pending, []
        transport = self.transport
        if not pending or transport is None or transport.is_closing():
            return
        transport.write(b"".join(pending))
        self.written_since_check = True
        if transport.get_write_buffer_size() > self.core.settings.caller_output_bytes:
            self.end(EndReason.SLOW_CLIENT)

    # Ending

    def end(self, reason: EndReason) -> None:
        """Stop the test (its SMTP session gets QUIT) and hang up; the first reason counts."""
        if self.admitting is not None:
            self.admitting.cancel()
            self.admitting = None
        if self.running is not None:
            self.running.stop(reason)
        self._close(abort=reason is EndReason.SLOW_CLIENT)

    def _test_done(self, running: RunningTest) -> None:
        """The core is done with the test, whatever ended it: say why if need be, hang up."""
        self.service.sessions.pop(self.session_id, None)
        if running.end_reason is EndReason.INTERNAL_ERROR:
            self.write_line(":Internal error; the test was stopped")
        elif running.end_reason is EndReason.SHUTDOWN:
            self.write_line(SHUTDOWN_MESSAGE)
        self._close(abort=running.end_reason is EndReason.SLOW_CLIENT)

    def _close(self, *, abort: bool = False) -> None:
        if not abort:
            self.flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()

    def _start_timer(self, delay: float, action: Callable[..., None], reason: object) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(delay, action, reason)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ReflectorService:
    """The telnet front door: listeners, one `TelnetSession` per caller, graceful shutdown."""

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        self.settings = core.settings
        self.metrics = core.metrics
        self.servers: list[asyncio.Server] = []
        self.sessions: dict[int, TelnetSession] = {}
        """Callers whose test is running."""

    @property
    def tasks(self) -> list[asyncio.Task[TestResult]]:
        return [
            session.running.task
            for session in self.sessions.values()
            if session.running is not None and session.running.task is not None
        ]

    async def start(self) -> list[Endpoint]:
        """Listen on every configured endpoint; return the addresses actually bound."""
        loop = asyncio.get_running_loop()
        bound: list[Endpoint] = []
        for endpoint in self.settings.listen:
            try:
                server = await loop.create_server(
                    lambda: TelnetSession(self),
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

    async def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    async def shutdown(self, *, grace: float = 3.0) -> None:
        """Stop accepting, tell running callers, QUIT their SMTP sessions and wait a little."""
        for server in self.servers:
            server.close()
        tasks = self.core.stop_all(EndReason.SHUTDOWN)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.close_listeners()
