"""The conversation: replies shown sanitised and bounded, failures mapped, errors counted."""

from __future__ import annotations

from typing import Any, cast

import pytest

from relayprobe.relaytest.budget import ErrorBudget
from relayprobe.relaytest.conversation import (
    MAX_REPLY_CHARS,
    MAX_REPLY_LINES,
    Conversation,
    SessionLost,
    UnusableReply,
)
from relayprobe.relaytest.events import Event, Progress, Received, Sent
from relayprobe.relaytest.smtpclient import (
    BadReply,
    Reply,
    ReplyTimeout,
    ServerDisconnected,
    SMTPSession,
)


class ScriptedSession:
    """Answers every command with one reply, or fails with one error."""

    def __init__(self, answer: Reply | Exception) -> None:
        self.answer = answer
        self.sent: list[bytes] = []

    async def command(self, line: bytes) -> Reply:
        self.sent.append(line)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def message(self, content: bytes) -> Reply:
        return await self.command(content)


OK = Reply(250, "ok")


def conversation(answer: Reply | Exception = OK) -> tuple[Conversation, list[Event]]:
    events: list[Event] = []
    talk = Conversation(emit=events.append, reply_timeout=7, budget=ErrorBudget(max_errors=2))
    talk.begin(cast(SMTPSession, cast(Any, ScriptedSession(answer))))
    return talk, events


def test_replies_are_shown_sanitised_and_counted() -> None:
    talk, events = conversation()
    talk.answered(Reply(550, "no \x1b[31mred\x1b[0m"))
    talk.answered(Reply(451, "later"))
    assert events == [Received(("550 no \\x1b[31mred\\x1b[0m",)), Received(("451 later",))]
    assert talk.budget.spent


def test_a_reply_of_several_lines_is_one_event_with_each_line_and_its_code() -> None:
    talk, events = conversation()
    talk.show(Reply(250, "mx.example\nPIPELINING\n\x9bSTARTTLS"))
    assert events == [Received(("250-mx.example", "250-PIPELINING", "250 \\x9bSTARTTLS"))]


def test_bytes_that_are_not_utf8_are_shown_escaped() -> None:
    talk, events = conversation()
    talk.show(Reply(220, b"mx \xff\xfe ready".decode("utf-8", "surrogateescape")))
    assert events == [Received(("220 mx \\xff\\xfe ready",))]


def test_a_long_reply_shows_its_first_lines_and_counts_the_rest() -> None:
    talk, events = conversation()
    talk.show(Reply(250, "\n".join("x" for _ in range(MAX_REPLY_LINES + 5))))
    received = [e for e in events if isinstance(e, Received)]
    assert len(received) == 1 and len(received[0].lines) == MAX_REPLY_LINES
    assert events[-1] == Progress("5 more reply lines not shown")


def test_past_the_budget_only_first_lines_cut_short_are_shown() -> None:
    talk, events = conversation()
    text = "y" * 1000
    while talk.reply_chars_shown < MAX_REPLY_CHARS:
        talk.show(Reply(250, text))
    events.clear()
    talk.show(Reply(250, f"{text}\n{text}\nend"))
    received = [e for e in events if isinstance(e, Received)]
    assert len(received) == 1 and len(received[0].lines) == 1
    shown = received[0].lines[0]
    assert shown.endswith("[cut: 1004 characters in all]") and len(shown) < 250


@pytest.mark.parametrize(
    ("failure", "lost", "reason"),
    [
        (ServerDisconnected(), SessionLost, "connection closed by the server"),
        (ReplyTimeout(), SessionLost, "no reply within 7 s"),
        (BadReply("not SMTP"), UnusableReply, "unusable reply (not SMTP)"),
    ],
)
async def test_client_failures_become_lost_sessions(
    failure: Exception, lost: type[SessionLost], reason: str
) -> None:
    talk, _ = conversation(failure)
    with pytest.raises(lost, match=reason.replace("(", r"\(").replace(")", r"\)")):
        await talk.command("NOOP")
    with pytest.raises(lost):
        await talk.message(b"Subject: x\r\n", description="(test message)")


async def test_a_command_is_sent_shown_and_its_reply_counted() -> None:
    talk, events = conversation(Reply(554, "no"))
    reply = await talk.command("RCPT TO:<a@b.example>")
    assert reply.code == 554
    assert events == [Sent("RCPT TO:<a@b.example>"), Received(("554 no",))]
    assert talk.budget.errors == 1


async def test_a_421_can_end_the_session() -> None:
    talk, _ = conversation(Reply(421, "closing"))
    with pytest.raises(SessionLost, match="421"):
        await talk.command("MAIL FROM:<>", lost_on_421=True)
