"""A small in-process mail server for the demo, the benchmarks and the tests.

It speaks just enough SMTP to be tested: a relay policy decides each RCPT, messages after DATA are
read (bounded) and dropped, or, for a fake that really relays, passed on to the next hop (the
canary sink) as a real open relay's queue would. Subclasses change single replies to play tarpits
and hostile servers.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_LINE = 4096
MAX_MESSAGE = 1 << 20
SILENCE = b""
FORWARD_TIMEOUT = 5.0
# The canary local part of a recipient, however the probe dressed it (%, !, quotes, routes).
_CANARY_LOCAL_PART = re.compile(rb"nobody-[a-z2-7]{10}")


def relays_nothing(rcpt: bytes) -> bool:
    return False


def relays_everything(rcpt: bytes) -> bool:
    return True


def relays_like_qmail(rcpt: bytes) -> bool:
    """qmail says 250 at RCPT to `%`, `!` and double-`@` local parts, then bounces them."""
    address = rcpt.removeprefix(b"TO:").strip(b"<>")
    return b"%" in address or b"!" in address or address.count(b"@") > 1 or b'"' in address


@dataclass
class SessionState:
    number: int
    commands: list[bytes] = field(default_factory=list)
    rcpt_count: int = 0
    recipients: list[bytes] = field(default_factory=list)
    tls: bool = False


class FakeMailServer:
    """Records every command line it receives, byte-exact, across all sessions."""

    def __init__(
        self,
        *,
        hostname: str = "mx.fake.test",
        relay: Callable[[bytes], bool] = relays_nothing,
        reply_delay: float = 0.0,
        forward_to: tuple[str, int] | None = None,
        forward_domain: str = "relaytest.invalid",
        tls: ssl.SSLContext | None = None,
        require_tls: bool = False,
    ) -> None:
        """With `tls`, EHLO offers STARTTLS; with `require_tls` too, MAIL before it gets 530."""
        self.hostname = hostname
        self.tls = tls
        self.require_tls = require_tls
        self.relay = relay
        self.reply_delay = reply_delay
        self.forward_to = forward_to
        self.forward_domain = forward_domain.encode()
        self._forwarding: set[asyncio.Task[None]] = set()
        self.commands: list[bytes] = []
        self.sessions = 0
        self.messages: list[bytes] = []
        self.quits = 0
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._address = "127.0.0.1"
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._address = host
        self._server = await asyncio.start_server(self._serve, host, port, backlog=2048)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and hang up on every open session."""
        if self._server is not None:
            self._server.close()
        for writer in self._handlers.values():
            writer.close()
        # Closed sessions end by themselves; cancelling them would make asyncio log an error.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2 + self.reply_delay)
        if self._forwarding:
            await asyncio.wait(self._forwarding, timeout=FORWARD_TIMEOUT)
        if self._server is not None:
            await self._server.wait_closed()

    # Hooks that subclasses override

    def greeting(self, session: SessionState) -> bytes | None:
        return f"220 {self.hostname} ESMTP fake".encode()

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        """The reply to one command line; SILENCE to say nothing, None to hang up."""
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            starttls = "250-STARTTLS\r\n" if self.tls is not None and not session.tls else ""
            return f"250-{self.hostname}\r\n{starttls}250-PIPELINING\r\n250 8BITMIME".encode()
        if verb == b"STARTTLS":
            if self.tls is None or session.tls:
                return b"502 5.5.1 Command not implemented"
            return b"220 2.0.0 Ready to start TLS"
        if self.require_tls and not session.tls and verb in {b"MAIL", b"RCPT", b"RSET"}:
            return b"530 5.7.0 Must issue a STARTTLS command first"
        if verb == b"HELO":
            return f"250 {self.hostname}".encode()
        if verb == b"MAIL":
            session.recipients.clear()
            return b"250 2.1.0 Ok"
        if verb == b"RCPT":
            session.rcpt_count += 1
            if self.relay(argument):
                session.recipients.append(argument)
                return b"250 2.1.5 Ok"
            return b"554 5.7.1 Relay access denied"
        if verb == b"DATA":
            return b"354 End data with <CR><LF>.<CR><LF>"
        if verb in {b"RSET", b"NOOP"}:
            return b"250 2.0.0 Ok"
        if verb == b"QUIT":
            return b"221 2.0.0 Bye"
        return b"502 5.5.2 Command not recognized"

    # The connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        session = SessionState(self.sessions)
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            await self._converse(reader, writer, session)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            del self._handlers[task]
            writer.close()
            self.closed.set()

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        writer.write(reply + b"\r\n")
        await writer.drain()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: SessionState
    ) -> None:
        greeting = self.greeting(session)
        if greeting is None:
            await reader.read(MAX_LINE)
            return
        await self._send(writer, greeting)
        while line := await reader.readuntil(b"\r\n"):
            command = line[:-2][:MAX_LINE]
            self.commands.append(command)
            session.commands.append(command)
            reply = self.reply(command, session)
            if reply is None:
                return
            if reply is not SILENCE:
                await self._send(writer, reply)
            if command.upper() == b"QUIT":
                self.quits += 1
                return
            if command.upper() == b"STARTTLS" and reply.startswith(b"220"):
                assert self.tls is not None
                await writer.start_tls(self.tls)
                session.tls = True
            if command.upper() == b"DATA" and reply.startswith(b"354"):
                message = await self._message(reader)
                self.messages.append(message)
                await self._send(writer, b"250 2.0.0 Ok: queued")
                self.queue_for_delivery(session.recipients, message)

    async def _message(self, reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        size = 0
        while (line := await reader.readuntil(b"\r\n")) != b".\r\n":
            size += len(line)
            if size <= MAX_MESSAGE:
                lines.append(line)
        return b"".join(lines)

    def queue_for_delivery(self, recipients: list[bytes], message: bytes) -> None:
        """Pass a message on to the next hop, if there is one (a hook for tests, too)."""
        if self.forward_to is None:
            return
        for recipient in recipients:
            if match := _CANARY_LOCAL_PART.search(recipient):
                address = match.group() + b"@" + self.forward_domain
                task = asyncio.create_task(self._forward(address, message))
                self._forwarding.add(task)
                task.add_done_callback(self._forwarding.discard)

    async def _forward(self, recipient: bytes, message: bytes) -> None:
        """Deliver one message to the next hop, as an open relay's queue would."""
        assert self.forward_to is not None
        host, port = self.forward_to
        try:
            async with asyncio.timeout(FORWARD_TIMEOUT):
                # From the server's own address, as a relay's queue would deliver.
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(self._address, 0)
                )
                try:
                    for line in (
                        f"HELO {self.hostname}".encode(),
                        b"MAIL FROM:<>",
                        b"RCPT TO:<" + recipient + b">",
                        b"DATA",
                        message + b".",
                        b"QUIT",
                    ):
                        await reader.readuntil(b"\r\n")
                        writer.write(line + b"\r\n")
                    await reader.read(MAX_LINE)
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
