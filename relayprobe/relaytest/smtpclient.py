"""The outbound SMTP connection of a relay test: the one module that uses aiosmtplib.

A session is aiosmtplib's protocol (`aiosmtplib.protocol.SMTPProtocol`: its reply parser, its
bounds on reply size, its STARTTLS) on a connection of our own, without the `SMTP` client
around it. A test opens three sessions and sends some sixty commands; the client's connect,
lock, argument scan and `wait_for` around every call cost more than the rest of our work, and
we need none of them: commands go out byte-exact as the probes made them (never through
`mail()`/`rcpt()`, which re-parse and re-quote addresses), one at a time. aiosmtplib's failures
become the built-in exception types below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

# aiosmtplib refuses a reply over 32 KiB (or a line over 8 KiB): that bound is ours too.
_TOO_LONG = "Response too long"
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


class ServerDisconnected(ConnectionError):
    """The server closed the connection."""


class ReplyTimeout(TimeoutError):
    """The server did not answer within the reply timeout."""


class BadReply(ValueError):
    """A reply too long to keep, or not SMTP at all."""


class TlsFailed(ConnectionError):
    """The TLS handshake after STARTTLS failed or timed out; the session is unusable."""


@dataclass(frozen=True, slots=True)
class TlsSession:
    """What STARTTLS negotiated, as the TLS library reports it (not yet sanitised)."""

    version: str
    cipher: str
    certificate: bytes | None
    """The server's certificate, DER; never verified (opportunistic TLS, RFC 7435)."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # A sending MTA's TLS: encrypt, verify nothing, and offer only TLS 1.2 and 1.3.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Reply(NamedTuple):
    """A server's reply, as aiosmtplib's parser made it; not sanitised."""

    code: int
    message: str
    """The text of its lines without their codes, joined by newlines; what is not UTF-8 is kept
    as surrogate escapes (`surrogateescape`)."""

    @property
    def lines(self) -> list[str]:
        """Each line with its code and `-` or space, as the server sent it (trimmed)."""
        code = str(self.code)
        *more, last = self.message.split("\n")
        return [f"{code}-{text}" for text in more] + [f"{code} {last}" if last else code]

    @property
    def line(self) -> str:
        """The whole reply on one line: its lines joined by spaces."""
        if "\n" in self.message:
            return " ".join(self.lines)
        return f"{self.code} {self.message}" if self.message else str(self.code)


def _translate(exc: aiosmtplib.SMTPException) -> Exception:
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return ServerDisconnected(str(exc))
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return ReplyTimeout(str(exc))
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.message == _TOO_LONG:
        return BadReply("reply over 32 KiB or a line over 8 KiB")
    return BadReply(str(exc))


def _cancel_not_swallowed() -> None:
    """Raise the cancellation that aiosmtplib's `asyncio.wait_for` may have swallowed.

    On Python 3.11, a cancel that arrives in the loop turn in which the awaited reply completes
    is dropped by `wait_for`, which returns the reply instead. The task still counts the request
    (`cancelling()`), so after every aiosmtplib await we honour it ourselves; otherwise a caller
    who hung up would have their test run to the end for nobody.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class SMTPSession:
    """One SMTP connection to the tested server."""

    def __init__(self, *, reply_timeout: float) -> None:
        self._protocol: SMTPProtocol | None = None
        self._reply_timeout = reply_timeout
        # Once: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._timeout_message = f"no reply within {reply_timeout:g} s"
        self._reply_due: float | None = None
        """When the reply awaited now is due (the event loop's clock); None when none is."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    async def connect(self, host: str, port: int, *, connect_timeout: float) -> Reply:
        """Connect within the connect timeout and return the greeting, whatever its code,
        within the reply timeout.

        Raises ConnectionRefusedError, TimeoutError (no connection), OSError, ServerDisconnected,
        ReplyTimeout or BadReply.
        """
        loop = self._loop
        async with asyncio.timeout(connect_timeout):
            _, self._protocol = await loop.create_connection(
                lambda: SMTPProtocol(loop=loop), host, port
            )
        # The protocol waits for the greeting from the moment it is connected.
        return await self._exchange(b"")

    def command(self, line: bytes) -> Coroutine[Any, Any, Reply]:
        """Send one command line (without CRLF) exactly as given and return the reply.

        The exchange itself is the awaitable: a coroutine frame less on each of the replies a
        test awaits.
        """
        return self._exchange(line + b"\r\n")

    def message(self, content: bytes) -> Coroutine[Any, Any, Reply]:
        """After a 354 to DATA: send the message, dot-stuffed and terminated; return the reply."""
        body = _DOT_AT_LINE_START.sub(b"..", content)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        return self._exchange(body + b".\r\n")

    async def _exchange(self, data: bytes) -> Reply:
        """Write `data` and read one reply within the reply timeout.

        Straight to aiosmtplib's protocol: `SMTP.execute_command` adds a lock, a scan of every
        argument and an `asyncio.wait_for` to each command, which a test that sends one command
        at a time, of text it made itself, does not need; they cost more than the rest of a
        command together. Without a timeout, aiosmtplib awaits the reply directly, so a cancel
        is never swallowed. The reply timeout is the session's watchdog (`_expect_reply`).
        """
        if self._timed_out:
            raise ReplyTimeout(self._timeout_message)
        protocol = self._protocol
        if protocol is None:
            raise ServerDisconnected("not connected")
        self._expect_reply()
        try:
            if data:
                protocol.write(data)
            response = await protocol.read_response()
        except aiosmtplib.SMTPException as exc:
            self.close()
            if self._timed_out:
                raise ReplyTimeout(self._timeout_message) from exc
            raise _translate(exc) from exc
        finally:
            self._reply_due = None
        return Reply(response.code, response.message)

    def _expect_reply(self) -> None:
        """Give the server the reply timeout from now for its next reply.

        One timer per session, moved on lazily: a command only notes when its reply is due, and
        the timer, when it fires early, sets itself for that time. A test sends some sixty
        commands, and a timer each (or an `asyncio.timeout` each) cost more than the rest of
        our work on a command. When a reply is late the session is closed, which ends the wait
        for it with an error that `_exchange` reports as the timeout.
        """
        loop = self._loop
        self._reply_due = loop.time() + self._reply_timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._reply_due, self._check_reply)

    def _check_reply(self) -> None:
        self._watchdog = None
        if self._reply_due is None:
            return  # nothing awaited: the next command sets the timer again
        loop = self._loop
        if loop.time() < self._reply_due:
            self._watchdog = loop.call_at(self._reply_due, self._check_reply)
            return
        self._timed_out = True
        self.close()

    async def start_tls(self) -> tuple[Reply, TlsSession | None]:
        """Send STARTTLS; after a 220, negotiate TLS, bounded by the reply timeout.

        Returns the reply and what was negotiated, or the reply and None when the server
        refused. Raises TlsFailed when the handshake fails (the server sent no TLS, or garbage),
        and the exceptions of `command`.
        """
        protocol = self._protocol
        if protocol is None:
            raise ServerDisconnected("not connected")
        try:
            response = await protocol.start_tls(_tls_context(), timeout=self._reply_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.message == _TOO_LONG:
                self.close()
                raise _translate(exc) from exc
            _cancel_not_swallowed()
            return Reply(exc.code, exc.message), None
        except aiosmtplib.SMTPTimeoutError as exc:
            self.close()
            raise TlsFailed("TLS handshake timed out") from exc
        except aiosmtplib.SMTPException as exc:
            self.close()
            raise _translate(exc) from exc
        except (ssl.SSLError, OSError) as exc:
            self.close()
            raise TlsFailed(f"TLS handshake failed: {exc.__class__.__name__}") from exc
        _cancel_not_swallowed()
        tls = protocol.transport.get_extra_info("ssl_object") if protocol.transport else None
        if not isinstance(tls, ssl.SSLObject):
            self.close()
            raise TlsFailed("TLS handshake failed: no TLS session")
        cipher = tls.cipher()
        return Reply(response.code, response.message), TlsSession(
            version=tls.version() or "TLS",
            cipher=cipher[0] if cipher else "unknown",
            certificate=tls.getpeercert(binary_form=True),
        )

    def send_quit_and_close(self) -> None:
        """Say QUIT without waiting for the answer, then close: for a test that was cancelled."""
        protocol = self._protocol
        if protocol is not None and protocol.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException):
                protocol.write(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.is_connected
