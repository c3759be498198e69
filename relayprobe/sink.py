"""The canary sink: the test domain's mail server, which records relayed test messages.

It is no open mailbox: RCPT is accepted only for a token the registry holds as pending, and every
connection is bounded in count, idle time, total time and message size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayprobe.canary import CanaryRegistry, token_from_address

NO_SUCH_TEST = "550 5.1.1 No such test"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
RECEIVED = "250 2.0.0 Test message received"
INTERNAL_ERROR = "451 4.3.0 Internal error"
TOO_MANY_CONNECTIONS = b"421 4.3.2 Too many connections, try again later\r\n"
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
        on_message: Callable[[list[str]], None],
    ) -> None:
        self._registry = registry
        self._domain = domain
        self._on_message = on_message

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
            return NO_SUCH_TEST
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # The recipients are the proof: each passed the pending check at RCPT. The content is
        # whatever the relay made of our message and is neither parsed nor trusted.
        arrived = []
        for address in envelope.rcpt_tos:
            token = token_from_address(address, domain=self._domain)
            if token is not None and self._registry.mark_arrived(token):
                arrived.append(token)
        self._on_message(arrived)
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
    """aiosmtpd's SMTP protocol, plus a cap on total connection time and bookkeeping for stop()."""

    def __init__(
        self,
        handler: _CanaryHandler,
        *,
        connections: _Connections,
        connection_timeout: float,
        **smtp_options: Any,
    ) -> None:
        super().__init__(handler, **smtp_options)
        self._connections = connections
        self._connection_timeout = connection_timeout
        self._deadline: asyncio.TimerHandle | None = None
        # Counted from creation, not from connection_made: a burst of accepts creates several
        # protocols before any of them is connected.
        connections.live.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self._connection_timeout, transport.close)
        if self._handler_coroutine is not None:
            self._connections.track(self._handler_coroutine)
        if self._connections.closing:
            transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._connections.live.discard(self)
        super().connection_lost(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Refusal(asyncio.Protocol):
    """What a connection beyond the cap gets: 421 and a close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writable = cast(asyncio.WriteTransport, transport)
        writable.write(TOO_MANY_CONNECTIONS)
        writable.close()


class CanarySink:
    """An SMTP receiver for `domain` that marks the tokens of arriving test messages."""

    def __init__(
        self,
        *,
        registry: CanaryRegistry,
        domain: str,
        hostname: str | None = None,
        max_message_bytes: int = 64 * 1024,
        max_connections: int = 100,
        idle_timeout: float = 30.0,
        connection_timeout: float = 120.0,
        on_delivery: Callable[[], None] | None = None,
    ) -> None:
        if not domain.strip("."):
            raise ValueError("the sink needs a test domain")
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_connections", max_connections),
            ("idle_timeout", idle_timeout),
            ("connection_timeout", connection_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        self._handler = _CanaryHandler(
            registry=registry, domain=domain, on_message=self._count_delivery
        )
        # Never None: aiosmtpd would ask socket.getfqdn(), a DNS lookup.
        self._hostname = hostname or domain
        self._max_message_bytes = max_message_bytes
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._connection_timeout = connection_timeout
        self._on_delivery = on_delivery
        self._connections = _Connections()
        self._server: asyncio.Server | None = None
        self.deliveries = 0

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
        self._server = await loop.create_server(
            lambda: self._new_protocol(loop, connections), host, port
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

    def _new_protocol(
        self, loop: asyncio.AbstractEventLoop, connections: _Connections
    ) -> asyncio.Protocol:
        if len(connections) >= self._max_connections:
            return _Refusal()
        return _SinkConnection(
            self._handler,
            connections=connections,
            connection_timeout=self._connection_timeout,
            hostname=self._hostname,
            ident=IDENT,
            data_size_limit=self._max_message_bytes,
            timeout=self._idle_timeout,
            loop=loop,
        )

    def _count_delivery(self, tokens: list[str]) -> None:
        self.deliveries += 1
        log.info("canary_delivery", tokens=tokens)
        if self._on_delivery is not None:
            self._on_delivery()
