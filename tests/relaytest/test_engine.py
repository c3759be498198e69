"""The engine against in-process fake mail servers on loopback."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest

from relayprobe.confirmation.canary import InMemoryRegistry
from relayprobe.confirmation.sinktls import sink_tls_context
from relayprobe.fakemx import (
    SILENCE,
    FakeMailServer,
    SessionState,
    relays_everything,
    relays_like_qmail,
    relays_nothing,
)
from relayprobe.relaytest import conversation
from relayprobe.relaytest.engine import run_relay_test
from relayprobe.relaytest.events import Event, Outcome, Progress, Received, Summary
from relayprobe.relaytest.options import RelayTestOptions
from relayprobe.relaytest.summary import TRANSCRIPT_ONLY, summarize
from relayprobe.reports.render import Transcript
from tests.conftest import StartServer

# What the classic suite must send to 127.0.0.1 whose banner names mx.fake.test, byte for byte.
CLASSIC_ENVELOPES = [
    (b"MAIL FROM:<spamtest@mx.fake.test>", b'RCPT TO:<"nobody@relaytest.invalid">'),
    (b"MAIL FROM:<nobody@relaytest.invalid>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@example.net>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@localhost>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@[127.0.0.1]>", b"RCPT TO:<nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<nobody%relaytest.invalid@mx.fake.test>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<nobody%relaytest.invalid@[127.0.0.1]>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b'RCPT TO:<"nobody@relaytest.invalid">'),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b'RCPT TO:<"nobody%relaytest.invalid">'),
    (b"MAIL FROM:<spamtest@[127.0.0.1]>", b'RCPT TO:<nobody@relaytest.invalid@mx.fake.test">'),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b'RCPT TO:<"nobody@relaytest.invalid"@[127.0.0.1]>'),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<nobody@relaytest.invalid@[127.0.0.1]>"),
    (b"MAIL FROM:<spamtest@[127.0.0.1]>", b"RCPT TO:<@mx.fake.test:nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<@[127.0.0.1]:nobody@relaytest.invalid>"),
    (b"MAIL FROM:<spamtest@[127.0.0.1]>", b"RCPT TO:<relaytest.invalid!nobody>"),
    (b"MAIL FROM:<spamtest@mx.fake.test>", b"RCPT TO:<relaytest.invalid!nobody@[127.0.0.1]>"),
    (b"MAIL FROM:<postmaster@mx.fake.test>", b"RCPT TO:<nobody@relaytest.invalid>"),
]
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


async def no_ptr(address: str, *, timeout: float) -> str | None:
    return None


class Run:
    def __init__(self, summary: Summary, transcript: list[str], events: list[Event]) -> None:
        self.summary = summary
        self.transcript = transcript
        self.events = events

    def outcomes(self) -> dict[str, Outcome]:
        return {probe.name: probe.outcome for probe in self.summary.probes}


async def run_test(port: int, *, address: str = "127.0.0.1", **options: object) -> Run:
    transcript = Transcript()
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        transcript.add(event)

    settings = RelayTestOptions(port=port, **{"reply_timeout": 2.0, **options})  # type: ignore[arg-type]
    summary = await run_relay_test(address, settings, emit, ptr_lookup=no_ptr)
    return Run(summary, transcript.lines, events)


def envelopes(server: FakeMailServer) -> list[tuple[bytes, bytes]]:
    pairs = []
    mail = None
    for command in server.commands:
        if command.startswith(b"MAIL"):
            mail = command
        elif command.startswith(b"RCPT"):
            assert mail is not None
            pairs.append((mail, command))
    return pairs


async def test_closed_server_rejects_every_probe_sent_byte_exact(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_nothing)
    run = await run_test(await start_server(server))
    assert envelopes(server) == CLASSIC_ENVELOPES
    assert set(run.outcomes().values()) == {Outcome.REJECTED}
    assert len(run.summary.probes) == 20
    assert run.summary.verdict == "rejected"
    assert run.transcript[0] == "Connecting to 127.0.0.1 ..."
    assert run.transcript[-3:] == [
        "Tested host banner: 220 mx.fake.test ESMTP fake",
        "System appeared to reject relay attempts",
        "Note: every relay attempt was refused: not an open relay to these probes",
    ]
    assert [line for line in run.transcript if line.startswith(":Relay test:")] == [
        ":Relay test: #Quote test",
        *(f":Relay test: #Test {n}" for n in range(1, 20)),
    ]
    assert server.quits == server.sessions
    assert b"EHLO relayprobe.invalid" in server.commands


async def test_open_server_accepts_every_probe(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_everything)
    run = await run_test(await start_server(server))
    assert set(run.outcomes().values()) == {Outcome.ACCEPTED}
    assert run.summary.verdict == "accepted"
    assert run.transcript[-2] == "System appeared to accept 20 relay attempts"


async def test_qmail_like_server_accepts_percent_bang_and_double_at(
    start_server: StartServer,
) -> None:
    server = FakeMailServer(relay=relays_like_qmail)
    run = await run_test(await start_server(server))
    accepted = sorted(
        name for name, outcome in run.outcomes().items() if outcome is Outcome.ACCEPTED
    )
    assert accepted == sorted(
        [
            "Quote test",
            "Test 8",
            "Test 9",
            "Test 10",
            "Test 11",
            "Test 12",
            "Test 13",
            "Test 14",
            "Test 15",
            "Test 16",
            "Test 17",
            "Test 18",
        ]
    )
    assert "System appeared to accept 12 relay attempts" in run.transcript


class DropsEverySecondRcpt(FakeMailServer):
    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"RCPT") and session.rcpt_count == 1:
            return None
        return super().reply(line, session)


async def test_server_that_drops_mid_suite_still_gets_every_probe(
    start_server: StartServer,
) -> None:
    server = DropsEverySecondRcpt(relay=relays_nothing)
    run = await run_test(await start_server(server))
    assert envelopes(server)[-1] == CLASSIC_ENVELOPES[-1]
    assert [probe.name for probe in run.summary.probes][-1] == "Test 19"
    assert Outcome.ERROR not in run.outcomes().values()
    assert run.summary.verdict == "rejected"
    assert any(
        line.startswith(":connection closed by the server during") for line in run.transcript
    )
    assert any(line.startswith(":Reconnecting to 127.0.0.1") for line in run.transcript)


@pytest.mark.parametrize(
    "make_server",
    [
        lambda: FakeMailServer(relay=relays_nothing),
        lambda: FakeMailServer(relay=relays_like_qmail),
        lambda: DropsEverySecondRcpt(relay=relays_nothing),
    ],
    ids=["closed", "qmail-like", "drops"],
)
async def test_the_summary_reads_nothing_from_the_transcripts_own_events(
    start_server: StartServer, make_server: Callable[[], FakeMailServer]
) -> None:
    """What lets the engine keep only the other events (a test under load holds on to what it
    keeps): leaving out the transcript's own changes nothing in the fold."""
    run = await run_test(await start_server(make_server()))
    everything = run.events[:-1]  # up to the summary
    facts = [event for event in everything if type(event) not in TRANSCRIPT_ONLY]
    assert len(facts) < len(everything) / 2
    assert summarize(facts) == summarize(everything) == run.summary


class StallsOnce(FakeMailServer):
    """Stops answering at the fifth RCPT of its first session, as a loaded server might."""

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"RCPT") and session.number == 1 and session.rcpt_count == 4:
            session.rcpt_count += 1
            return SILENCE
        return super().reply(line, session)


async def test_server_that_stalls_mid_suite_is_retried_after_reply_timeout(
    start_server: StartServer,
) -> None:
    server = StallsOnce(relay=relays_nothing)
    run = await run_test(await start_server(server), reply_timeout=0.3)
    assert len(envelopes(server)) == 21  # one probe tried twice
    assert Outcome.ERROR not in run.outcomes().values()
    assert any("no reply within 0.3 s during Test 4" in line for line in run.transcript)


class SlowAtFirst(FakeMailServer):
    """Answers its first six commands after 0.2 s each, then at once: slow, never silent."""

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        self.reply_delay = 0.2 if len(self.commands) <= 6 else 0.0
        return super().reply(line, session)


async def test_the_reply_timeout_runs_from_each_command_not_from_the_first(
    start_server: StartServer,
) -> None:
    """One timer per session is moved on lazily (smtpclient): six replies in 0.2 s each take
    1.2 s, four times the reply timeout, and none of them is late."""
    run = await run_test(await start_server(SlowAtFirst(relay=relays_nothing)), reply_timeout=0.3)
    assert not any("no reply within" in line for line in run.transcript)
    assert run.summary.verdict == "rejected"


class Tarpit(FakeMailServer):
    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        return SILENCE


async def test_tarpit_ends_within_the_reply_timeout(start_server: StartServer) -> None:
    port = await start_server(Tarpit())
    started = time.monotonic()
    run = await run_test(port, reply_timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert run.summary.verdict == "incomplete"
    assert run.transcript[-3:] == [
        "Tested host banner: 220 mx.fake.test ESMTP fake",
        "Test incomplete: no reply within 0.5 s",
        "Note: the test did not finish, so it says nothing yet about relaying",
    ]


class SilentGreeting(FakeMailServer):
    def greeting(self, session: SessionState) -> bytes | None:
        return None


async def test_no_greeting_is_incomplete_after_the_reply_timeout(
    start_server: StartServer,
) -> None:
    port = await start_server(SilentGreeting())
    started = time.monotonic()
    run = await run_test(port, reply_timeout=0.3, connect_timeout=5.0)
    assert time.monotonic() - started < 1.5
    assert run.transcript[-2] == "Test incomplete: no greeting within 0.3 s"
    assert not any(line.startswith("Tested host banner") for line in run.transcript)


class Greets421(FakeMailServer):
    def greeting(self, session: SessionState) -> bytes | None:
        return b"421 4.3.2 mx.fake.test busy, come back later"


async def test_421_greeting_is_incomplete(start_server: StartServer) -> None:
    server = Greets421()
    run = await run_test(await start_server(server))
    assert run.summary.verdict == "incomplete"
    assert run.transcript[-2] == (
        "Test incomplete: server refused the session: 421 4.3.2 mx.fake.test busy, come back later"
    )
    assert "<<< 421 4.3.2 mx.fake.test busy, come back later" in run.transcript
    assert server.commands == []


async def test_refused_connection_is_incomplete() -> None:
    server = FakeMailServer()
    port = await server.start()
    await server.stop()
    run = await run_test(port)
    assert run.summary.verdict == "incomplete"
    assert run.transcript == [
        "Connecting to 127.0.0.1 ...",
        "Test incomplete: connection refused",
        "Note: the test did not finish, so it says nothing yet about relaying",
    ]


class RefusesEhlo(FakeMailServer):
    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"EHLO"):
            return b"502 5.5.1 EHLO not implemented"
        return super().reply(line, session)


async def test_ehlo_refused_falls_back_to_helo(start_server: StartServer) -> None:
    server = RefusesEhlo()
    run = await run_test(await start_server(server))
    assert server.commands[:2] == [b"EHLO relayprobe.invalid", b"HELO relayprobe.invalid"]
    # Later sessions go straight to HELO.
    assert server.commands.count(b"EHLO relayprobe.invalid") == 1
    assert run.summary.verdict == "rejected"


class Hostile(FakeMailServer):
    def greeting(self, session: SessionState) -> bytes | None:
        return b"220 evil.test \x1b[2J\x1b]0;pwned\x07 \x00\xff\xfe \xc2\x9b31m ESMTP"

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"EHLO"):
            return b"\r\n".join(b"250-" + b"X" * 196 for _ in range(299)) + b"\r\n250 END"
        if line.startswith(b"RCPT"):
            return b"554 5.7.1 \x1b[31mdenied\x08\x08\r\x7f \xe2\x80\xae reversed"
        return super().reply(line, session)


async def test_hostile_server_output_is_sanitised_and_test_goes_on(
    start_server: StartServer,
) -> None:
    server = Hostile()
    run = await run_test(await start_server(server))
    for line in run.transcript:
        assert not CONTROL.search(line), line
        assert "\u202e" not in line
    assert run.summary.banner is not None
    assert "\\x1b[2J" in run.summary.banner
    assert "\\xff\\xfe" in run.summary.banner
    assert b"HELO relayprobe.invalid" in server.commands
    assert len(run.summary.probes) == 20
    assert run.summary.verdict == "rejected"


class LongEhlo(FakeMailServer):
    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"EHLO"):
            return b"\r\n".join(b"250-EXT%d" % n for n in range(300)) + b"\r\n250 END"
        return super().reply(line, session)


async def test_long_reply_is_cut_with_a_note(start_server: StartServer) -> None:
    run = await run_test(await start_server(LongEhlo()))
    assert ":261 more reply lines not shown" in run.transcript
    assert "<<< 250-EXT39" in run.transcript
    assert "<<< 250-EXT40" not in run.transcript


class FloodsEveryReply(FakeMailServer):
    """Every reply is 25 lines of 1,200 escape bytes, as a hostile server's could be."""

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        reply = super().reply(line, session)
        if reply is None or reply is SILENCE:
            return reply
        code = reply[:3]
        flood = b"\x1b" * 1200
        return b"\r\n".join([code + b"-" + flood] * 24 + [code + b" " + flood])


async def test_reply_text_shown_per_test_is_bounded(start_server: StartServer) -> None:
    """Fails before the fix: every one of ~60 replies showed 25 lines of 4,000 characters."""
    run = await run_test(await start_server(FloodsEveryReply()))
    shown = sum(
        len(line) for event in run.events if isinstance(event, Received) for line in event.lines
    )
    # The budget, the one reply that crosses it, then a short first line per reply.
    crossing = conversation.MAX_REPLY_LINES * 1100
    cut_lines = 100 * (conversation.CUT_REPLY_CHARS + 40)
    assert shown < conversation.MAX_REPLY_CHARS + crossing + cut_lines
    assert ":Over 64 KiB of replies shown: from here on only the first line of each" in (
        run.transcript
    )
    assert len(run.summary.probes) == 20
    assert run.summary.verdict == "rejected"


class CountsErrorsLikePostfix(FakeMailServer):
    """Drops a session at its 10th error, as a server stricter than stock Postfix would."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.errors: dict[int, int] = {}
        self.limit_hit = 0

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        reply = super().reply(line, session)
        if reply is not None and reply[:1] in (b"4", b"5"):
            self.errors[session.number] = self.errors.get(session.number, 0) + 1
            if self.errors[session.number] >= 10:
                self.limit_hit += 1
                return None
        return reply


async def test_fresh_session_before_the_error_limit(start_server: StartServer) -> None:
    server = CountsErrorsLikePostfix(relay=relays_nothing)
    run = await run_test(await start_server(server))
    assert server.limit_hit == 0
    assert max(server.errors.values()) <= 8
    assert ":Opening a fresh session before the server's error limit" in run.transcript
    assert run.summary.verdict == "rejected"


class SyntaxStrict(FakeMailServer):
    """Exim-like: IP-literal senders are a syntax error, and 3 syntax errors end the session."""

    def __init__(self) -> None:
        super().__init__()
        self.syntax_errors: dict[int, int] = {}
        self.dropped = 0

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"MAIL") and b"[" in line:
            count = self.syntax_errors.get(session.number, 0) + 1
            self.syntax_errors[session.number] = count
            if count >= 3:
                self.dropped += 1
                return b"421 too many syntax or protocol errors"
            return b"501 5.1.3 bad sender address syntax"
        return super().reply(line, session)


async def test_fresh_session_before_exim_syntax_error_limit(start_server: StartServer) -> None:
    server = SyntaxStrict()
    run = await run_test(await start_server(server))
    assert server.dropped == 0
    assert run.outcomes()["Test 7"] is Outcome.REJECTED
    assert Outcome.ERROR not in run.outcomes().values()


async def test_whole_test_deadline(start_server: StartServer) -> None:
    server = FakeMailServer(reply_delay=0.05)
    run = await run_test(await start_server(server), deadline=0.5)
    assert run.summary.verdict == "incomplete"
    assert "Test incomplete: test deadline of 0.5 s reached" in run.transcript
    assert len(run.summary.probes) == 20
    untried = [probe for probe in run.summary.probes if probe.reply == "not tried"]
    assert untried and all(probe.outcome is Outcome.ERROR for probe in untried)
    assert all("{" not in probe.mail_from + probe.rcpt_to for probe in untried)


async def test_cancelled_test_says_quit_and_closes_at_once(start_server: StartServer) -> None:
    server = FakeMailServer(reply_delay=0.2)
    port = await start_server(server)
    task = asyncio.create_task(run_test(port))
    await asyncio.sleep(0.7)
    assert server.sessions == 1
    task.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.closed.wait(), 1.0)
    assert time.monotonic() - cancelled_at < 1.0
    assert server.commands[-1] == b"QUIT"


@pytest.mark.parametrize("during", ["probes", "confirm wait"])
async def test_a_cancelled_test_forgets_its_tokens(start_server: StartServer, during: str) -> None:
    port = await start_server(FakeMailServer(relay=relays_everything, reply_delay=0.01))
    registry = InMemoryRegistry()
    waiting = asyncio.Event()

    def emit(event: Event) -> None:
        if isinstance(event, Progress) and event.text.startswith("Waiting up to"):
            waiting.set()

    options = RelayTestOptions(port=port, reply_timeout=2.0, confirm_wait=30.0)
    task = asyncio.create_task(
        run_relay_test("127.0.0.1", options, emit, registry=registry, ptr_lookup=no_ptr)
    )
    async with asyncio.timeout(10):
        if during == "probes":
            while len(registry) < 3:
                await asyncio.sleep(0.01)
        else:
            await waiting.wait()
    assert len(registry) > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(registry) == 0


async def test_ipv6_target(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_nothing)
    try:
        port = await server.start("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        run = await run_test(port, address="::1")
    finally:
        await server.stop()
    assert b"MAIL FROM:<spamtest@[IPv6:::1]>" in server.commands
    assert run.summary.verdict == "rejected"


class _CancelsWithTheReply(FakeMailServer):
    """Cancels the test in the same loop turn as its reply to one command reaches the client.

    The cancel is queued before the reply is written, so it runs just before the client reads
    the reply: aiosmtplib's `wait_for` then sees its reply done and swallows the cancel (Python
    3.11), as happens under load when a caller hangs up.
    """

    def __init__(self, *, trigger: bytes) -> None:
        super().__init__()
        self.trigger = trigger
        self.test: asyncio.Task[Run] | None = None
        self.cancelled_after = -1

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line == self.trigger and self.test is not None and self.cancelled_after < 0:
            asyncio.get_running_loop().call_soon(self.test.cancel)
            self.cancelled_after = len(self.commands)
        return super().reply(line, session)


@pytest.mark.parametrize(
    "trigger", [b"EHLO relayprobe.invalid", b"MAIL FROM:<spamtest@example.net>", b"RSET"]
)
async def test_cancel_arriving_with_a_reply_still_stops_the_test(
    start_server: StartServer, trigger: bytes
) -> None:
    """Fails before the fix: the cancel was lost and the test ran all 20 probes for nobody."""
    server = _CancelsWithTheReply(trigger=trigger)
    port = await start_server(server)
    server.test = asyncio.create_task(run_test(port))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(server.test, 5)
    await asyncio.wait_for(server.closed.wait(), 1.0)
    after = server.commands[server.cancelled_after :]
    # At most the interrupted probe's next command, then QUIT; no new probe.
    assert after[-1] == b"QUIT"
    assert len(after) <= 2
    assert not any(command.startswith(b"MAIL") for command in after)


# STARTTLS

TLS = sink_tls_context(hostname="mx.tls.test")
REQUIRED = "Note: the probes ran over TLS (the server requires STARTTLS): TLS 1.3, "


def tls_lines(run: Run) -> list[str]:
    return [line for line in run.transcript if line.startswith(":TLS ")]


async def test_server_that_requires_tls_is_tested_over_tls(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_nothing, tls=TLS, require_tls=True)
    run = await run_test(await start_server(server))
    start = run.transcript.index(">>> STARTTLS")
    assert run.transcript[start - 2 : start + 4] == [
        ">>> MAIL FROM:<spamtest@mx.fake.test>",
        "<<< 530 5.7.0 Must issue a STARTTLS command first",
        ">>> STARTTLS",
        "<<< 220 2.0.0 Ready to start TLS",
        run.transcript[start + 2],
        ">>> EHLO relayprobe.invalid",
    ]
    assert re.fullmatch(
        r":TLS 1\.3, TLS_\w+, certificate CN=mx\.tls\.test, self-signed, expires \d{4}-\d\d-\d\d",
        run.transcript[start + 2],
    )
    assert run.summary.verdict == "rejected"
    assert all(probe.tls and probe.outcome is Outcome.REJECTED for probe in run.summary.probes)
    assert run.summary.tls.required and run.summary.tls.offered
    assert run.summary.tls.used is not None
    assert run.summary.tls.used.certificate is not None
    assert run.summary.tls.used.certificate.self_signed
    assert any(line.startswith(REQUIRED) for line in run.summary.lines)
    # Reconnects before the error limit say STARTTLS again.
    assert server.commands.count(b"STARTTLS") == server.sessions


async def test_tls_required_and_off_is_incomplete_not_rejected(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_nothing, tls=TLS, require_tls=True)
    run = await run_test(await start_server(server), starttls="never")
    assert run.summary.verdict == "incomplete"
    assert (
        "Test incomplete: the server requires STARTTLS (530) and TLS is off (--starttls never)"
        in run.transcript
    )
    assert "System appeared to reject relay attempts" not in run.transcript
    assert Outcome.REJECTED not in set(run.outcomes().values())
    assert b"STARTTLS" not in server.commands


async def test_tls_offered_but_not_required_stays_in_plaintext(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_nothing, tls=TLS)
    run = await run_test(await start_server(server))
    assert b"STARTTLS" not in server.commands
    assert not any(probe.tls for probe in run.summary.probes)
    assert (
        "Note: the server offers STARTTLS; the probes ran in plaintext, as a spammer's would"
        in run.summary.lines
    )


async def test_always_says_starttls_whenever_offered(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_everything, tls=TLS)
    run = await run_test(await start_server(server), starttls="always")
    assert run.transcript[2:4] == [">>> EHLO relayprobe.invalid", "<<< 250-mx.fake.test"]
    assert ">>> STARTTLS" in run.transcript[4:8]
    assert all(probe.tls for probe in run.summary.probes)
    assert run.summary.verdict == "accepted"
    assert any(
        line.startswith("Note: the probes ran over TLS (--starttls always): TLS 1.3, ")
        for line in run.summary.lines
    )


class GarbageAfterStarttls(FakeMailServer):
    """Offers STARTTLS and says 220 to it, then sends plain text where TLS should start."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.garbage_sent = 0

    def reply(self, line: bytes, session: SessionState) -> bytes | None:
        if line.startswith(b"EHLO"):
            return b"250-mx.fake.test\r\n250 STARTTLS"
        if line == b"STARTTLS":
            return b"220 2.0.0 Ready to start TLS"
        return super().reply(line, session)

    async def _send(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        await super()._send(writer, reply)
        if reply.startswith(b"220 2.0.0 Ready"):
            await asyncio.sleep(0.05)  # after the client's ClientHello
            writer.write(b"this is not TLS at all, sorry\r\n" * 20)
            self.garbage_sent += 1


async def test_tls_required_but_handshake_fails_is_incomplete(start_server: StartServer) -> None:
    server = GarbageAfterStarttls(require_tls=True)
    run = await run_test(await start_server(server))
    assert server.garbage_sent == 1
    assert run.summary.verdict == "incomplete"
    incomplete = [line for line in run.transcript if line.startswith("Test incomplete: ")]
    assert incomplete == [
        "Test incomplete: the server requires STARTTLS (530), but TLS handshake failed: SSLError"
    ]


async def test_always_goes_on_in_plaintext_when_the_handshake_fails(
    start_server: StartServer,
) -> None:
    server = GarbageAfterStarttls(relay=relays_nothing)
    run = await run_test(await start_server(server), starttls="always")
    assert server.garbage_sent == 1
    assert ":TLS handshake failed: SSLError; reconnecting to go on in plaintext" in run.transcript
    assert run.summary.verdict == "rejected"
    assert len(run.summary.probes) == 20
    assert "Note: the probes ran in plaintext: TLS handshake failed: SSLError" in run.summary.lines


async def test_530_without_starttls_offered_is_incomplete(start_server: StartServer) -> None:
    server = FakeMailServer(require_tls=True)
    run = await run_test(await start_server(server))
    assert b"STARTTLS" in server.commands
    assert run.summary.verdict == "incomplete"
    assert (
        "Test incomplete: the server requires STARTTLS (530), but STARTTLS refused: "
        "502 5.5.1 Command not implemented"
    ) in run.transcript
