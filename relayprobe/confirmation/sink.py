"""The canary sink: the test domain's mail server, which records relayed test messages.

It is no open mailbox: RCPT is accepted only for a token the registry holds as pending, a message
counts only when its body carries the token's secret, and every connection is bounded in count
(per address, per prefix and in all), idle time, total time, time until it names a pending test's
recipient, message size, message bytes per second, unknown recipients and reply rate (see
`SinkLimits`). It offers STARTTLS (never requires it) with the operator's certificate or a throwaway
one, and the limits hold over TLS as before: a connection keeps its slot and deadlines through the
upgrade, and the handshake gets no longer than the wait between two commands. While the registry
is down or slow, RCPT and the end of DATA get a 451, and the relay tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, AnyStr, NoReturn, cast

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from relayprobe.confirmation.canary import CanaryRegistry, RegistryUnavailable, token_from_address
from relayprobe.confirmation.sinklimits import Refusal, SinkGuard, SinkLimits
from relayprobe.confirmation.sinktls import sink_tls_context
from relayprobe.frontdoors.addresses import IPAddress, unmap_ipv4
from relayprobe.frontdoors.tcpstate import LISTEN_BACKLOG

# The sink's connections are known to its guard by their transports.
_Guard = SinkGuard[asyncio.BaseTransport]

NO_SUCH_TEST = "550 5.1.1 No such test"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_MANY_UNKNOWN = "421 4.7.0 Too many unknown recipients, closing connection"
RECEIVED = "250 2.0.0 Test message received"
NOT_A_TEST_MESSAGE = "554 5.7.1 Not a test message of this service: it is not counted"
INTERNAL_ERROR = "451 4.3.0 Internal error"
REGISTRY_UNAVAILABLE = "451 4.3.0 Test registry unavailable, try again later"
MESSAGE_TOO_BIG = "552 5.3.4 Message too big, closing connection"
# RFC 5321 4.5.3.1.6: 1,000 octets with the CRLF; aiosmtpd's StreamReader allows one more.
LINE_TOO_LONG = "500 5.5.2 Line too long, closing connection"
TLS_ALREADY_ACTIVE = "503 5.5.1 TLS already active"
TOO_MANY_CONNECTIONS = b"421 4.3.2 Too many connections, try again later\r\n"
NO_TEST_RECIPIENT = (
    b"421 4.4.2 No recipient of a running test named in time, closing connection\r\n"
)
IDENT = "relayprobe canary sink"
# A relay delivers one probe's message at a time; a hundred recipients is already generous.
MAX_RECIPIENTS = 100
# The longest the registry may take over one RCPT or one message's recipients. A shared
# registry bounds each call itself, more tightly; past this, a relay is better off retrying.
REGISTRY_TIMEOUT_S = 2.0

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
        if token is None:
            return cast(_SinkConnection, server).unknown_recipient()
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                pending = await self._registry.is_pending(token)
        except (RegistryUnavailable, TimeoutError):
            # Logged and counted by the registry, once per outage: not here, per recipient.
            return REGISTRY_UNAVAILABLE
        if not pending:
            return cast(_SinkConnection, server).unknown_recipient()
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        cast(_SinkConnection, server).delivering()
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
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                for address in envelope.rcpt_tos:
                    token = token_from_address(address, domain=self._domain)
                    if token is None:
                        continue
                    secret = await self._registry.message_secret(token)
                    if not secret:  # an empty one would be in every message
                        continue
                    if secret.encode("ascii") not in content:
                        unproven.append(token)
                    elif await self._registry.mark_arrived(token, source=source):
                        arrived.append(token)
        except (RegistryUnavailable, TimeoutError):
            # The relay keeps the message and tries again; an arrival already marked stays.
            return REGISTRY_UNAVAILABLE
        if unproven and not arrived:
            self._on_unproven(unproven, source)
            return NOT_A_TEST_MESSAGE
        self._on_message(arrived, source)
        return RECEIVED

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd offers AUTH once TLS is on. The sink has no accounts, and a relay that sees
        # AUTH might send it credentials.
        session.host_name = hostname
        return [line for line in responses if not line.startswith("250-AUTH")]

    async def handle_exception(self, error: Exception) -> str:
        # Replaces aiosmtpd's own handler, which logs the traceback with client data in it.
        log.error("canary_sink_error", error=type(error).__name__)
        return INTERNAL_ERROR


class _Connections:
    """The sink's live connections, by the transport they were admitted on, and their tasks, so
    that stop() leaves nothing running."""

    def __init__(self) -> None:
        self.live: dict[asyncio.BaseTransport, _SinkConnection] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self.live)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close_all(self) -> None:
        self.closing = True
        for connection in list(self.live.values()):
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
        guard: _Guard,
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
        self._canary = handler
        self._guard = guard
        self._limits = limits
        self._connections = connections
        self._admitted: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._recipient_deadline: asyncio.TimerHandle | None = None
        self._unknown_recipients = 0
        self._hanging_up = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._admitted is not None:
            # Again after STARTTLS, with the TLS transport: the same connection, whose slot and
            # deadlines stay as they are.
            return
        self._admitted = transport
        self._connections.live[transport] = self
        self._deadline = self.loop.call_later(self._limits.connection_timeout, self.close)
        # Until it names a pending test's recipient, a connection is only a claim on a slot.
        self._recipient_deadline = self.loop.call_later(
            self._limits.recipient_timeout, self.hang_up, NO_TEST_RECIPIENT
        )
        if self._handler_coroutine is not None:
            self._connections.track(self._handler_coroutine)

    def connection_lost(self, error: Exception | None) -> None:
        for deadline in (self._deadline, self._recipient_deadline):
            if deadline is not None:
                deadline.cancel()
        if self._admitted is not None:
            self._connections.live.pop(self._admitted, None)
            self._guard.release(self._admitted)
        super().connection_lost(error)

    def close(self) -> None:
        """Close now. Over TLS: after sending close_notify, without waiting for the peer's,
        which asyncio would wait for up to 30 s."""
        if self.transport is not None:
            self.transport.close()
        if self._admitted is not None:
            self._admitted.close()

    def hang_up(self, reply: bytes) -> None:
        """Send `reply` (over TLS if it is on) and close."""
        if self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).write(reply)
        self.close()

    def _timeout_cb(self) -> None:
        # aiosmtpd's idle timeout closes only the TLS layer, which then waits for the peer.
        self.close()

    def delivering(self) -> None:
        """This connection named a pending test's recipient: no deadline for that, no eviction."""
        if self._recipient_deadline is not None:
            self._recipient_deadline.cancel()
        if self._admitted is not None:
            self._guard.delivering(self._admitted)

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
            self._end()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls_protocol is not None:
            # aiosmtpd would start TLS inside TLS.
            await self.push(TLS_ALREADY_ACTIVE)
            return
        # A client that says STARTTLS and then stalls gets no longer than between two commands.
        with contextlib.suppress(TimeoutError, TLSSetupException):
            async with asyncio.timeout(self._limits.idle_timeout):
                await super().smtp_STARTTLS(arg)
        assert self.session is not None
        if self._tls_protocol is not None and self.session.ssl is None:
            self._drop_unencrypted()

    def _drop_unencrypted(self) -> NoReturn:
        """End a connection whose TLS handshake failed, stalled or was cut off. asyncio's TLS
        layer reports the loss of a connection only after a handshake: it is reported here."""
        assert self._admitted is not None
        cast(asyncio.WriteTransport, self._admitted).abort()
        if self.transport is not None:
            self.connection_lost(None)
        raise asyncio.CancelledError

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.envelope is not None and self.session is not None
        if arg or not self.envelope.rcpt_tos:
            # aiosmtpd's 501 or 503; it reads no message then.
            await super().smtp_DATA(arg)
            return
        # aiosmtpd's own DATA reads to the final dot however big the message, and only then
        # answers 552; this one stops at the limit and paces the bytes of each prefix.
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_message()
        self.envelope.content = self.envelope.original_content = content
        status = await self._canary.handle_DATA(self, self.session, self.envelope)
        self.envelope = self._create_envelope()
        await self.push(status)

    async def _read_message(self) -> bytes:
        """The message up to its final dot, dot-unstuffed (RFC 5321 4.5.2). Past
        `max_message_bytes`, or a line past the line limit, the connection ends."""
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                await self.push(LINE_TOO_LONG)
                self._end()
            if line == b".\r\n":
                return b"".join(lines)
            size += len(line)
            if size > self._limits.max_message_bytes:
                await self.push(MESSAGE_TOO_BIG)
                self._end()
            lines.append(line[1:] if line.startswith(b".") else line)
            # At least one line per connection per turn of the event loop, and no more bytes
            # than the prefix's budget: a stream of DATA is paced as replies are.
            await asyncio.sleep(self._guard.message_delay(self.source, len(line)))

    def _end(self) -> NoReturn:
        """Close now and end this connection's task as a hang-up would: nothing already
        buffered is read after."""
        self.close()
        raise asyncio.CancelledError

    async def push(self, status: AnyStr) -> None:
        # One reply per connection per turn of the event loop, and no more than the shared
        # reply rate: a flood of commands gets a bounded share of the loop, not all of it. The
        # wait comes before the reply, so that nothing is read between a reply and what follows
        # it: after STARTTLS's 220 the client's handshake must reach the TLS layer, not the
        # plaintext buffer.
        await asyncio.sleep(self._guard.reply_delay())
        await super().push(status)


class _Gate(asyncio.Protocol):
    """A new connection until its peer is known: handed to the SMTP protocol, or refused."""

    def __init__(self, admit: Callable[[asyncio.BaseTransport], None]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admit(transport)


def _hang_up(transport: asyncio.BaseTransport, reply: bytes) -> None:
    cast(asyncio.WriteTransport, transport).write(reply)
    transport.close()


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the context STARTTLS uses; by default one with a throwaway self-signed
        certificate for `hostname`."""
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
        self._tls = tls or sink_tls_context(hostname=self._hostname)
        self._limits = limits or SinkLimits()
        self._clock = clock
        self._on_delivery = on_delivery
        self._connections = _Connections()
        self._server: asyncio.Server | None = None
        self.deliveries = 0
        self.unproven = 0
        self.refused: Counter[Refusal] = Counter()
        self.evicted = 0

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
        guard = _Guard(self._limits, clock=self._clock)
        self._server = await loop.create_server(
            lambda: _Gate(lambda transport: self._admit(transport, loop, connections, guard)),
            host,
            port,
            backlog=LISTEN_BACKLOG,
            start_serving=False,
        )
        for listener in self._server.sockets:
            # Accepted sockets inherit it. Paced reading leaves a stream of DATA in the kernel,
            # which would otherwise grow the buffer to megabytes per connection.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._limits.max_message_bytes)
        await self._server.start_serving()
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
        guard: _Guard,
    ) -> None:
        """Hand a new connection to SMTP, or refuse it with 421 (or, when stopping, just close).
        When full, a connection that has not named a pending test's recipient may be evicted
        (421) to make room."""
        source = _peer_address(transport)
        if connections.closing or source is None:
            transport.close()
            return
        admission = guard.admit(transport, source)
        if isinstance(admission, str):
            self.refused[admission] += 1
            _hang_up(transport, TOO_MANY_CONNECTIONS)
            return
        if admission.evicted is not None:
            self.evicted += 1
            connections.live[admission.evicted].hang_up(TOO_MANY_CONNECTIONS)
        connection = _SinkConnection(
            self._handler,
            source=source,
            guard=guard,
            limits=self._limits,
            connections=connections,
            hostname=self._hostname,
            ident=IDENT,
            tls_context=self._tls,
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
