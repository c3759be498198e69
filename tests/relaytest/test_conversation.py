"""The conversation: replies shown sanitised and bounded, failures mapped, errors counted."""

from __future__ import annotations

import pytest

from relayprobe.relaytest.budget import ErrorBudget
from relayprobe.relaytest.conversation import (
    MAX_REPLY_CHARS,
    MAX_REPLY_LINES,
    Conversation,
    SessionLost,
    UnusableReply,
)
from relayprobe.relaytest.events import Event, Progress, Received
from relayprobe.relaytest.smtpclient import BadReply, Reply, ReplyTimeout, ServerDisconnected


def conversation() -> tuple[Conversation, list[Event]]:
    events: list[Event] = []
    talk = Conversation(emit=events.append, reply_timeout=7, budget=ErrorBudget(max_errors=2))
    return talk, events


async def replying(reply: Reply) -> Reply:
    return reply


def test_replies_are_shown_sanitised_and_counted() -> None:
    talk, events = conversation()
    talk.answered(Reply(550, (b"550 no \x1b[31mred\x1b[0m",)))
    talk.answered(Reply(451, (b"451 later",)))
    assert events == [Received("550 no \\x1b[31mred\\x1b[0m"), Received("451 later")]
    assert talk.budget.spent


def test_a_long_reply_shows_its_first_lines_and_counts_the_rest() -> None:
    talk, events = conversation()
    talk.show(Reply(250, tuple(b"250-x" for _ in range(MAX_REPLY_LINES + 5))))
    assert len([e for e in events if isinstance(e, Received)]) == MAX_REPLY_LINES
    assert events[-1] == Progress("5 more reply lines not shown")


def test_past_the_budget_only_first_lines_cut_short_are_shown() -> None:
    talk, events = conversation()
    line = b"250-" + b"y" * 1000
    while talk.reply_chars_shown < MAX_REPLY_CHARS:
        talk.show(Reply(250, (line,)))
    events.clear()
    talk.show(Reply(250, (line, line, b"250 end")))
    received = [e for e in events if isinstance(e, Received)]
    assert len(received) == 1
    shown = received[0].line
    assert shown.endswith("[cut: 1004 bytes in all]") and len(shown) < 250


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
    talk, _ = conversation()

    async def failing() -> Reply:
        raise failure

    with pytest.raises(lost, match=reason.replace("(", r"\(").replace(")", r"\)")):
        await talk.exchange(failing())


async def test_exchange_shows_and_counts_the_reply() -> None:
    talk, events = conversation()
    reply = await talk.exchange(replying(Reply(554, (b"554 no",))))
    assert reply.code == 554
    assert events == [Received("554 no")]
    assert talk.budget.errors == 1
