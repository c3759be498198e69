"""The canary sink: the test domain's mail server, which records relayed test messages.

It is no open mailbox: RCPT is accepted only for a token the registry holds as pending, a message
counts only when its body carries the token's secret, and every connection is bounded in count
(per address, per prefix and in all), idle time, total time, message size, unknown recipients and
reply rate (see `SinkLimits`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, AnyStr, cast

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayprobe.access import IPAddress, unmap_ipv4
from relayprobe.canary import CanaryRegistry, token_from_address
from relayprobe.sinklimits import Refusal, SinkGuard, SinkLimits

NO_SUCH_TEST = "550 5.1.1 No such test"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_MANY_UNKNOWN = "421 4.7.0 Too many unknown recipients, closing connection"
RECEIVED = "250 2.0.0 Test message received"
NOT_A_TEST_MESSAGE = "554 5.7.1 Not a test message of this service: it is not counted"
INTERNAL_ERROR = "451 4.3.0 Internal error"
TOO_MANY_CONNECTIONS = b"421 4.3.2 Too many connections, try again later\r\n"
REFUSALS: dict[Refusal, bytes] = {
    "capacity": TOO_MANY_CONNECTIONS,
    "address": TOO_MANY_CONNECTIONS,
    "prefix": TOO_MANY_CONNECTIONS,
    "throttled": b"421 4.7.0 Too many unknown recipients from your network, try again later\r\n",
}
IDENT = "relayprobe canary sink"
# A relay delivers one probe's message at a time; a hundred recipients is already generous.
MAX_RECIPIENTS = 100

log = structlog.get_logger()


class _CanaryHandler:
    """aiosmtpd's hooks: which recipients exist, and what a finished message proves."""

    def __init__(
        self,
        *,
        registry: CanaryRegistry,
        domain: str,
        on_message: Callable[[list[str], str], None],
        on_unproven: Callable[[list[str], str], None],
    ) -> None:
        self._registry = registry
        self._domain = domain
        self._on_message = on_message
        self._on_unproven = on_unproven

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        token = token_from_address(address, domain=self._domain)
        if token is None or not self._registry.is_pending(token):
            return cast(_SinkConnection, server).unknown_recipient()
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Each recipient passed the pending check at RCPT; the message proves its token only if
        # it carries the token's secret, which the caller never sees. Nothing else in it is
        # parsed or trusted.
        source = str(cast(_SinkConnection, server).source)
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        arrived: list[str] = []
        unproven: list[str] = []
        for address in envelope.rcpt_tos:
            token = token_from_address(address, domain=self._domain)
            if token is None:
                continue
            if self._registry.message_secret(token).encode("ascii") not in content:
                unproven.append(token)
            elif self._registry.mark_arrived(token, source=source):
                arrived.append(token)
        if unproven and not arrived:
            self._on_unproven(unproven, source)
            return NOT_A_TEST_MESSAGE
        self._on_message(arrived, source)
        return RECEIVED

    async def handle_exception(self, error: Exception) -> str:
        # Replaces aiosmtpd's own handler, which logs the traceback with client data in it.
        log.error("canary_sink_error", error=type(error).__name__)
        return INTERNAL_ERROR


class _Connections:
    """The sink's live connections and their tasks, so that stop() leaves nothing running."""

    def __init__(self) -> None:
        self.live: set[_SinkConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self.live)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close_all(self) -> None:
        self.closing = True
        for connection in list(self.live):
            connection.close()
        # Connections accepted just before the listener closed join late and are closed at once.
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _SinkConnection(SMTP):
    """aiosmtpd's SMTP protocol, plus the sink's limits and bookkeeping for stop()."""

    def __init__(
        self,
        handler: _CanaryHandler,
        *,
        source: IPAddress,
        guard: SinkGuard,
        limits: SinkLimits,
        connections: _Connections,
        **smtp_options: Any,
    ) -> None:
        super().__init__(
            handler,
            data_size_limit=limits.max_message_bytes,
            timeout=limits.idle_timeout,
            **smtp_options,
        )
        self.source = source
        self._guard = guard
        self._limits = limits
        self._connections = connections
        self._deadline: asyncio.TimerHandle | None = None
        self._unknown_recipients = 0
        self._hanging_up = False
        connections.live.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self._limits.connection_timeout, transport.close)
        if self._handler_coroutine is not None:
            self._connections.track(self._handler_coroutine)

    def connection_lost(self, error: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._connections.live.discard(self)
        self._guard.release(self.source)
        super().connection_lost(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def unknown_recipient(self) -> str:
        """The reply to an unknown recipient: 550 while this connection and its source have
        budget left, else 421, and the connection ends after it."""
        self._unknown_recipients += 1
        within_budget = self._guard.unknown_recipient(self.source)
        if within_budget and self._guard.throttled(self.source):
            # Once per episode: the recipient that spent the budget. Not per refusal, which
            # would let a flood write the log.
            log.warning("canary_sink_throttled", source=str(self.source))
        if within_budget and self._unknown_recipients <= self._limits.max_unknown_recipients:
            return NO_SUCH_TEST
        self._hanging_up = True
        return TOO_MANY_UNKNOWN

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(arg)
        if self._hanging_up:
            assert self.transport is not None and self._handler_coroutine is not None
            self.transport.close()
            self._handler_coroutine.cancel()
            # The cancellation lands here: no command already buffered is read after the 421.
            await asyncio.sleep(0)

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        # One reply per connection per turn of the event loop, and no more than the shared
        # reply rate: a flood of commands gets a bounded share of the loop, not all of it.
        await asyncio.sleep(self._guard.reply_delay())


class _Gate(asyncio.Protocol):
    """A new connection until its peer is known: handed to the SMTP protocol, or refused."""

    def __init__(self, admit: Callable[[asyncio.BaseTransport], None]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admit(transport)


def _peer_address(transport: asyncio.BaseTransport) -> IPAddress | None:
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        return unmap_ipv4(ipaddress.ip_address(str(peer[0]).partition("%")[0]))
    except ValueError:
        return None


class CanarySink:
    """An SMTP receiver for `domain` that marks the tokens of arriving test messages."""

    def __init__(
        self,
        *,
        registry: CanaryRegistry,
        domain: str,
        hostname: str | None = None,
        limits: SinkLimits | None = None,
        on_delivery: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not domain.strip("."):
            raise ValueError("the sink needs a test domain")
        self._handler = _CanaryHandler(
            registry=registry,
            domain=domain,
            on_message=self._count_delivery,
            on_unproven=self._count_unproven,
        )
        # Never None: aiosmtpd would ask socket.getfqdn(), a DNS lookup.
        self._hostname = hostname or domain
        self._limits = limits or SinkLimits()
        self._clock = clock
        self._on_delivery = on_delivery
        self._connections = _Connections()
        self._server: asyncio.Server | None = None
        self.deliveries = 0
        self.unproven = 0
        self.refused: Counter[Refusal] = Counter()

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host`:`port` (0: any free port); return the address actually bound."""
        if self._server is not None:
            raise RuntimeError("the canary sink is already started")
        # aiosmtpd logs every command line it receives; nothing from the network is logged raw.
        logging.getLogger("mail.log").disabled = True
        loop = asyncio.get_running_loop()
        connections = self._connections = _Connections()
        guard = SinkGuard(self._limits, clock=self._clock)
        self._server = await loop.create_server(
            lambda: _Gate(lambda transport: self._admit(transport, loop, connections, guard)),
            host,
            port,
        )
        bound = self._server.sockets[0].getsockname()
        log.info("canary_sink_listening", host=bound[0], port=bound[1])
        return str(bound[0]), int(bound[1])

    async def stop(self) -> None:
        """Stop listening, close every connection and wait until their tasks are done."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self._connections.close_all()
        await server.wait_closed()

    def _admit(
        self,
        transport: asyncio.BaseTransport,
        loop: asyncio.AbstractEventLoop,
        connections: _Connections,
        guard: SinkGuard,
    ) -> None:
        """Hand a new connection to SMTP, or refuse it with 421 (or, when stopping, just close)."""
        source = _peer_address(transport)
        if connections.closing or source is None:
            transport.close()
            return
        refusal = guard.admit(source)
        if refusal is not None:
            self.refused[refusal] += 1
            writable = cast(asyncio.WriteTransport, transport)
            writable.write(REFUSALS[refusal])
            writable.close()
            return
        connection = _SinkConnection(
            self._handler,
            source=source,
            guard=guard,
            limits=self._limits,
            connections=connections,
            hostname=self._hostname,
            ident=IDENT,
            loop=loop,
        )
        transport.set_protocol(connection)
        connection.connection_made(transport)

    def _count_delivery(self, tokens: list[str], source: str) -> None:
        self.deliveries += 1
        log.info("canary_delivery", tokens=tokens, source=source)
        if self._on_delivery is not None:
            self._on_delivery()

    def _count_unproven(self, tokens: list[str], source: str) -> None:
        self.unproven += 1
        log.warning("canary_unproven", tokens=tokens, source=source)
