"""Opening an SMTP session for a relay test: connect, greeting, EHLO (or HELO), STARTTLS.

The opener remembers across sessions what only the first can tell (the banner), what a
session taught the next (use HELO; TLS failed, stay in plaintext) and what TLS the server
offers or demands; the events say the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayprobe.relaytest.certificate import describe
from relayprobe.relaytest.conversation import (
    SESSION_ERRORS,
    Conversation,
    IncompleteTest,
    SessionLost,
    UnusableReply,
)
from relayprobe.relaytest.events import Greeted, Sent, TlsOffered, TlsStarted, TlsUnused
from relayprobe.relaytest.hostname import banner_hostname
from relayprobe.relaytest.sanitize import sanitize_line, sanitize_text
from relayprobe.relaytest.smtpclient import (
    BadReply,
    Reply,
    ReplyTimeout,
    ServerDisconnected,
    SMTPSession,
    TlsFailed,
)

_STARTTLS = re.compile("STARTTLS", re.IGNORECASE | re.ASCII)


def offers_starttls(ehlo: Reply) -> bool:
    """Whether an EHLO reply lists STARTTLS. ASCII case only: Unicode case mapping would read
    "\u017ftarttls" (with a long s) as STARTTLS."""
    return any(_STARTTLS.match(text) for text in ehlo.message.split("\n"))


class TlsUnavailable(ConnectionError):
    """STARTTLS was refused or its handshake failed; the message says which."""


@dataclass(slots=True)
class TlsState:
    """What the engine needs to decide on TLS."""

    offered: bool = False
    required: bool = False
    failure: str | None = None
    """Why TLS could not be used; no later session tries again."""
    over_tls: bool = False

    def wanted(self, policy: str, *, offered: bool) -> bool:
        """Whether a new session should say STARTTLS right after EHLO."""
        if self.failure is not None:
            return False
        return self.required or (policy == "always" and offered)


class SessionOpener:
    """Opens the sessions of one relay test, as `policy` (auto, always, never) says for TLS."""

    def __init__(
        self,
        conversation: Conversation,
        target: str,
        *,
        port: int,
        helo_name: str,
        connect_timeout: float,
        reply_timeout: float,
        starttls: str,
    ) -> None:
        self.conversation = conversation
        self.target = target
        self.port = port
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.starttls = starttls
        self.use_helo = False
        self.banner_name: str | None = None
        self.greeted = False
        self.tls = TlsState()

    async def open(self) -> None:
        """Connect, read the greeting, say EHLO (or HELO) and, where wanted, STARTTLS and EHLO
        again; raise IncompleteTest if we can't.

        Each retry changes something that can change only once (HELO instead of EHLO,
        plaintext after a failed handshake), so the loop ends.
        """
        talk = self.conversation
        while True:
            session = SMTPSession(reply_timeout=self.reply_timeout)
            greeting = await self._connect(session)
            talk.show(greeting)
            if not 200 <= greeting.code < 300:
                session.close()
                raise IncompleteTest(
                    f"server refused the session: {sanitize_line(greeting.lines[0])}"
                )
            if not self.greeted:
                self.greeted = True
                self.banner_name = banner_hostname(greeting.lines[0])
                talk.emit(Greeted(sanitize_line(greeting.lines[0]), self.banner_name))
            talk.begin(session)
            self.tls.over_tls = False
            try:
                offered = await self._greet()
                if self.tls.wanted(self.starttls, offered=offered):
                    await self.start_tls()
                return
            except UnusableReply as exc:
                # A hostile or broken EHLO reply (300 lines, say): HELO's is one line.
                talk.drop()
                if self.use_helo:
                    raise IncompleteTest(str(exc)) from None
                self.use_helo = True
                talk.progress(f"{exc}; reconnecting to use HELO")
            except TlsUnavailable as exc:
                if self.tls.required:
                    raise IncompleteTest(f"the server requires STARTTLS, but {exc}") from None
                self.tls.failure = str(exc)
                talk.emit(TlsUnused(str(exc)))
                if talk.session is not None:
                    talk.progress(f"{exc}; going on in plaintext")
                    return
                talk.progress(f"{exc}; reconnecting to go on in plaintext")
            except SessionLost as exc:
                talk.drop()
                raise IncompleteTest(str(exc)) from None

    async def reopen(self) -> None:
        self.conversation.progress(f"Reconnecting to {self.target} ...")
        try:
            await self.open()
        except IncompleteTest as exc:
            raise IncompleteTest(f"cannot reconnect: {exc}") from None

    async def start_tls(self) -> None:
        """STARTTLS, then EHLO again: after TLS the session starts over (RFC 3207 4.2).

        Raises TlsUnavailable when the server refuses (the plaintext session stays open) or the
        handshake fails (the session is gone).
        """
        talk = self.conversation
        assert talk.session is not None
        talk.emit(Sent("STARTTLS"))
        try:
            reply, negotiated = await talk.session.start_tls()
        except TlsFailed as exc:
            talk.drop()
            raise TlsUnavailable(str(exc)) from None
        except SESSION_ERRORS as exc:
            raise talk.lost(exc) from None
        talk.answered(reply)
        if negotiated is None:
            raise TlsUnavailable(f"STARTTLS refused: {sanitize_line(reply.lines[0])}")
        certificate = negotiated.certificate
        talk.emit(
            TlsStarted(
                version=sanitize_text(negotiated.version),
                cipher=sanitize_text(negotiated.cipher),
                certificate=describe(certificate) if certificate else None,
            )
        )
        self.tls.over_tls = True
        await self._greet()

    async def _connect(self, session: SMTPSession) -> Reply:
        try:
            return await session.connect(
                self.target, self.port, connect_timeout=self.connect_timeout
            )
        except ConnectionRefusedError:
            reason = "connection refused"
        except ReplyTimeout:
            reason = f"no greeting within {self.reply_timeout:g} s"
        except TimeoutError:
            reason = f"no connection within {self.connect_timeout:g} s"
        except ServerDisconnected:
            reason = "connection closed before the greeting"
        except BadReply as exc:
            reason = f"unusable greeting: {exc}"
        except OSError as exc:
            reason = f"cannot connect: {exc.strerror or exc}"
        session.close()
        raise IncompleteTest(reason)

    async def _greet(self) -> bool:
        """EHLO, or HELO after a 5xx to it; whether the server offers STARTTLS."""
        talk = self.conversation
        if not self.use_helo:
            reply = await talk.command(f"EHLO {self.helo_name}")
            if 200 <= reply.code < 300:
                offered = offers_starttls(reply)
                if offered and not self.tls.offered:
                    self.tls.offered = True
                    talk.emit(TlsOffered())
                return offered
            if reply.code < 500:
                raise SessionLost(f"EHLO refused: {sanitize_line(reply.lines[0])}")
            self.use_helo = True
        reply = await talk.command(f"HELO {self.helo_name}")
        if not 200 <= reply.code < 300:
            raise SessionLost(f"HELO refused: {sanitize_line(reply.lines[0])}")
        return False
