"""The SMTP session a relay test is in: each command and reply as events, bounded.

Every reply is shown sanitised and counted against the session's error budget; past a budget of
shown text, only each reply's first line is shown, so a hostile server's long replies cost
little whatever their number. The SMTP client's failures become `SessionLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from relayprobe.relaytest.budget import ErrorBudget
from relayprobe.relaytest.events import Event, Progress, Received, Sent
from relayprobe.relaytest.sanitize import MAX_DISPLAY_CHARS, sanitize_line
from relayprobe.relaytest.smtpclient import (
    BadReply,
    Reply,
    ReplyTimeout,
    ServerDisconnected,
    SMTPSession,
)

Emit = Callable[[Event], None]

# More reply lines than this are counted, not shown: a 300-line EHLO says nothing useful.
MAX_REPLY_LINES = 40
# Reply text a test shows in full; past it, only each reply's first line, cut short.
MAX_REPLY_CHARS = 64 * 1024
CUT_REPLY_CHARS = 200
# Enough for a QUIT at the end, short enough not to hold up the summary.
QUIT_TIMEOUT = 2.0


class IncompleteTest(Exception):
    """The test cannot go on: no usable session with the server."""


class SessionLost(ConnectionError):
    """The session ended under a probe: EOF, 421, a reply timeout or an unusable reply."""


class UnusableReply(SessionLost):
    """A reply too long to keep or not SMTP at all; the session can't be trusted after it."""


SESSION_ERRORS = (ServerDisconnected, ReplyTimeout, BadReply)
"""What the SMTP client raises when a session ends under a command (see `Conversation.lost`)."""


class Conversation:
    """One relay test's current SMTP session (or none), and what it has shown so far."""

    def __init__(self, *, emit: Emit, reply_timeout: float, budget: ErrorBudget) -> None:
        self.emit = emit
        self.reply_timeout = reply_timeout
        self.budget = budget
        self.session: SMTPSession | None = None
        self.reply_chars_shown = 0

    def begin(self, session: SMTPSession) -> None:
        """`session` is now the test's; its error count starts from nothing."""
        self.session = session
        self.budget.reset()

    async def command(self, line: str, *, lost_on_421: bool = False) -> Reply:
        session = self.session
        assert session is not None
        self.emit(Sent(line))
        try:
            reply = await session.command(line.encode("ascii"))
        except SESSION_ERRORS as exc:
            raise self.lost(exc) from None
        self.answered(reply)
        if lost_on_421 and reply.code == 421:
            raise SessionLost("the server is closing the session (421)")
        return reply

    async def message(self, content: bytes, *, description: str) -> Reply:
        """After a 354 to DATA: send a message (shown as `description` and the dot)."""
        session = self.session
        assert session is not None
        self.emit(Sent(description))
        self.emit(Sent("."))
        try:
            reply = await session.message(content)
        except SESSION_ERRORS as exc:
            raise self.lost(exc) from None
        self.answered(reply)
        return reply

    def answered(self, reply: Reply) -> None:
        self.show(reply)
        self.budget.record(reply.code)

    def lost(self, error: Exception) -> SessionLost:
        """One of the SMTP client's `SESSION_ERRORS` as the engine's: the session is lost, or
        unusable."""
        if isinstance(error, ReplyTimeout):
            return SessionLost(f"no reply within {self.reply_timeout:g} s")
        if isinstance(error, BadReply):
            return UnusableReply(f"unusable reply ({error})")
        return SessionLost("connection closed by the server")

    def show(self, reply: Reply) -> None:
        """Emit the reply as shown: sanitised, at most MAX_REPLY_LINES lines, and past
        MAX_REPLY_CHARS of replies in a test only its first line, cut short."""
        in_full = self.reply_chars_shown < MAX_REPLY_CHARS
        limit = MAX_DISPLAY_CHARS if in_full else CUT_REPLY_CHARS
        if "\n" in reply.message:
            lines = reply.lines
            shown = lines[:MAX_REPLY_LINES] if in_full else lines[:1]
            hidden = len(lines) - len(shown)
            texts = tuple([sanitize_line(line, limit=limit) for line in shown])
            self.reply_chars_shown += sum(map(len, texts))
        else:
            text = sanitize_line(reply.line, limit=limit)
            texts, hidden = (text,), 0
            self.reply_chars_shown += len(text)
        self.emit(Received(texts))
        if hidden > 0:
            self.progress(f"{hidden} more reply lines not shown")
        if in_full and self.reply_chars_shown >= MAX_REPLY_CHARS:
            self.progress(
                f"Over {MAX_REPLY_CHARS // 1024} KiB of replies shown: from here on only the "
                "first line of each"
            )

    def progress(self, text: str) -> None:
        self.emit(Progress(text))

    async def quit(self) -> None:
        if self.session is None:
            return
        with contextlib.suppress(SessionLost, TimeoutError):
            async with asyncio.timeout(QUIT_TIMEOUT):
                await self.command("QUIT")
        self.drop()

    def drop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
