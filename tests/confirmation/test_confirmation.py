"""Delivery confirmation with in-process fakes: the seed's qmail case and a relaying fake."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import smtplib
from collections.abc import Callable, Collection

import pytest

from relayprobe.app import canary_sink, local_registry
from relayprobe.confirmation.canary import ArrivalCallback, InMemoryRegistry, RegistryUnavailable
from relayprobe.fakemx import FakeMailServer, relays_like_qmail, relays_nothing
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.relaytest.engine import run_relay_test
from relayprobe.relaytest.events import Event, Outcome, Sent
from relayprobe.reports.render import Transcript
from tests.conftest import StartServer

TOKEN_RCPT = re.compile(rb"RCPT TO:<.*nobody-([a-z2-7]{10})")
TOKEN_IN_SENT = re.compile(r"^\(test message: \d+ lines, token ([a-z2-7]{10})\)$")


async def no_ptr(address: str, *, timeout: float) -> str | None:
    return None


async def confirmed_test(port: int, *, wait: float = 1.0) -> Transcript:
    settings = dataclasses.replace(
        Settings(),
        target_port=port,
        reply_timeout=2.0,
        sink_listen=Endpoint("127.0.0.1", 0),
        confirm_wait=wait,
    )
    transcript = Transcript()
    registry = local_registry(settings)

    def emit(event: Event) -> None:
        transcript.add(event)

    async with canary_sink(settings, registry):
        await run_relay_test(
            "127.0.0.1", settings.test_options(), emit, registry=registry, ptr_lookup=no_ptr
        )
    return transcript


async def test_qmail_case_accepts_but_is_not_confirmed(start_server: StartServer) -> None:
    server = FakeMailServer(relay=relays_like_qmail)
    transcript = await confirmed_test(await start_server(server), wait=0.5)
    summary = transcript.summary
    assert summary is not None
    accepted = [probe.name for probe in summary.probes if probe.outcome is Outcome.ACCEPTED]
    assert len(accepted) == 12
    assert summary.verdict == "accepted"
    assert transcript.lines[-4:] == [
        "Tested host banner: 220 mx.fake.test ESMTP fake",
        "System appeared to accept 12 relay attempts",
        "Relay not confirmed: none of 12 test messages arrived within 0.5 s",
        "Note: the 12 accepted recipients use address forms (%-hack, bang path, quoted local "
        "part, source route, two @ signs) that qmail and some other servers accept and then "
        "bounce; only delivery proves relaying, and no test message arrived",
    ]
    assert ":Waiting up to 0.5 s for relayed test messages ..." in transcript.lines
    # Every accepted probe sent a test message that carries its own token.
    assert len(server.messages) == 12
    tokens = [m.group(1) for c in server.commands if (m := TOKEN_RCPT.match(c))]
    assert len(set(tokens)) == 20
    for message in server.messages:
        token = re.search(rb"X-Relayprobe-Token: ([a-z2-7]{10})\r\n", message)
        assert token is not None and token.group(1) in tokens
        assert b"\r\n\r\n" in message and b"Subject: relayprobe relay test " in message
        # Each carries its secret, which the caller never sees.
        secret = re.search(rb"\r\nCheck: ([0-9a-f]{32})\r\n", message)
        assert secret is not None
        assert not any(secret.group(1).decode() in line for line in transcript.lines)


class DeliversFirstMessageOnly(FakeMailServer):
    """An open relay whose queue loses all but the first message."""

    def queue_for_delivery(self, recipients: list[bytes], message: bytes) -> None:
        if len(self.messages) == 1:
            super().queue_for_delivery(recipients, message)


async def test_relay_confirmed_when_a_message_arrives(start_server: StartServer) -> None:
    settings = dataclasses.replace(
        Settings(), sink_listen=Endpoint("127.0.0.1", 0), confirm_wait=1.0
    )
    registry = local_registry(settings)
    transcript = Transcript()
    async with canary_sink(settings, registry) as sink:
        assert sink is not None
        server = DeliversFirstMessageOnly(relay=lambda rcpt: b"%" in rcpt)
        server.forward_to = (sink.host, sink.port)
        port = await start_server(server)
        await run_relay_test(
            "127.0.0.1",
            dataclasses.replace(settings, target_port=port).test_options(),
            transcript.add,
            registry=registry,
            ptr_lookup=no_ptr,
        )
    summary = transcript.summary
    assert summary is not None
    assert summary.verdict == "relayed"
    assert [p.name for p in summary.probes if p.outcome is Outcome.RELAYED] == ["Test 8"]
    # The fake relay delivers from its own address, as a relay's queue does.
    assert any(
        re.fullmatch(r":Relayed: Test 8 arrived after \d+\.\d s from 127\.0\.0\.1", line)
        for line in transcript.lines
    )
    assert transcript.lines[-3:] == [
        "System appeared to accept 3 relay attempts",
        "Relay confirmed: 1 of 3 test messages arrived (Test 8)",
        "Note: this is an open relay: it passed test messages on to a third party's domain; "
        "the user guide shows how to close it",
    ]


async def test_confirmation_off_says_so_in_a_note(start_server: StartServer) -> None:
    port = await start_server(FakeMailServer(relay=relays_nothing))
    transcript = Transcript()
    settings = dataclasses.replace(Settings(), target_port=port)
    await run_relay_test("127.0.0.1", settings.test_options(), transcript.add, ptr_lookup=no_ptr)
    assert transcript.lines[-2:] == [
        "Note: delivery confirmation is off: no canary sink configured; to prove relaying, run "
        "one (--sink-listen ADDR:PORT) and point the MX of relaytest.invalid at it",
        "Note: every relay attempt was refused: not an open relay to these probes",
    ]
    assert ">>> RCPT TO:<nobody@relaytest.invalid>" in transcript.lines


class CountingRegistry(InMemoryRegistry):
    """Counts the calls a test makes: each is a round trip to a shared registry."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def register(self, token: str, *, ttl: float) -> str:
        self.calls.append("register")
        return await super().register(token, ttl=ttl)

    async def forget(self, tokens: Collection[str]) -> None:
        self.calls.append("forget")
        await super().forget(tokens)


@pytest.mark.parametrize(
    ("relay", "calls"),
    [(relays_nothing, []), (relays_like_qmail, ["register"] * 12 + ["forget"])],
)
async def test_only_accepted_recipients_cost_the_registry_anything(
    start_server: StartServer, relay: Callable[[bytes], bool], calls: list[str]
) -> None:
    """A closed server, the common case, costs a shared registry no round trip at all."""
    registry = CountingRegistry()
    port = await start_server(FakeMailServer(relay=relay))
    settings = dataclasses.replace(
        Settings(), target_port=port, sink_listen=Endpoint("127.0.0.1", 0), confirm_wait=0.1
    )
    await run_relay_test(
        "127.0.0.1", settings.test_options(), Transcript().add, registry=registry, ptr_lookup=no_ptr
    )
    assert registry.calls == calls
    assert len(registry) == 0


async def test_a_caller_delivering_its_own_tokens_does_not_confirm(
    start_server: StartServer,
) -> None:
    """Finding 9: the tokens are in the transcript; a caller that delivers them itself to the
    sink, for a server that never relays, must not get "Relay confirmed"."""
    settings = dataclasses.replace(
        Settings(), sink_listen=Endpoint("127.0.0.1", 0), confirm_wait=1.0
    )
    registry = local_registry(settings)
    transcript = Transcript()
    forging: list[asyncio.Task[None]] = []
    async with canary_sink(settings, registry) as sink:
        assert sink is not None

        async def deliver(token: str) -> None:
            # Everything the transcript shows: the token, the probe, the headers' shape.
            message = (
                f"Subject: relayprobe relay test {token} (Test 8)\r\n"
                f"X-Relayprobe-Token: {token}\r\n\r\nToken: {token}\r\n"
            )

            def send() -> None:
                with (
                    smtplib.SMTP(sink.host, sink.port, local_hostname="caller.test") as smtp,
                    contextlib.suppress(smtplib.SMTPDataError),  # the sink's 554
                ):
                    smtp.sendmail("", [f"nobody-{token}@relaytest.invalid"], message)

            await asyncio.to_thread(send)

        def emit(event: Event) -> None:
            transcript.add(event)
            if isinstance(event, Sent) and (token := TOKEN_IN_SENT.search(event.line)):
                forging.append(asyncio.create_task(deliver(token.group(1))))

        port = await start_server(FakeMailServer(relay=relays_like_qmail))
        await run_relay_test(
            "127.0.0.1",
            dataclasses.replace(settings, target_port=port).test_options(),
            emit,
            registry=registry,
            ptr_lookup=no_ptr,
        )
        await asyncio.gather(*forging)
    summary = transcript.summary
    assert summary is not None
    assert len(forging) == 12
    assert summary.verdict == "accepted"
    assert not any(line.startswith(":Relayed:") for line in transcript.lines)
    assert transcript.lines[-2].startswith("Relay not confirmed: none of 12 test messages")


class UnreachableRegistry(InMemoryRegistry):
    """A registry that fails as a shared one does when its server is away: at `failing`."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing
        self.arrived: list[str] = []

    async def register(self, token: str, *, ttl: float) -> str:
        secret = await super().register(token, ttl=ttl)
        if self.failing == "register":
            raise RegistryUnavailable("register: no answer")
        return secret

    async def wait(
        self, tokens: Collection[str], *, timeout: float, on_arrival: ArrivalCallback
    ) -> set[str]:
        first = next(iter(tokens))
        if self.failing == "wait after an arrival":
            on_arrival(first, 0.5, "192.0.2.25")
            raise RegistryUnavailable("wait: no answer")
        if self.failing == "wait":
            raise RegistryUnavailable("wait: no answer")
        return await super().wait(tokens, timeout=timeout, on_arrival=on_arrival)


async def run_with(registry: InMemoryRegistry, start_server: StartServer) -> Transcript:
    server = FakeMailServer(relay=lambda rcpt: b"%" in rcpt)
    settings = dataclasses.replace(
        Settings(),
        target_port=await start_server(server),
        sink_listen=Endpoint("127.0.0.1", 0),
        confirm_wait=30.0,
    )
    transcript = Transcript()
    await run_relay_test(
        "127.0.0.1",
        settings.test_options(),
        transcript.add,
        registry=registry,
        ptr_lookup=no_ptr,
    )
    return transcript


UNAVAILABLE = "Note: delivery confirmation unavailable: registry unreachable"


@pytest.mark.parametrize("failing", ["register", "wait"])
async def test_an_unreachable_registry_turns_confirmation_off_with_a_note(
    start_server: StartServer, failing: str
) -> None:
    registry = UnreachableRegistry(failing)
    async with asyncio.timeout(10):  # not the confirm wait of 30 s
        transcript = await run_with(registry, start_server)
    summary = transcript.summary
    assert summary is not None and summary.verdict == "accepted"
    waited = ":Waiting up to 30 s for relayed test messages ..." in transcript.lines
    assert waited == (failing == "wait")
    # Every probe runs. A token is registered only for an accepted recipient, before its test
    # message: tokens stop at the first registration that fails, and no message follows.
    rcpts = [line for line in transcript.lines if line.startswith(">>> RCPT TO:")]
    with_token = [index for index, line in enumerate(rcpts) if "nobody-" in line]
    assert len(rcpts) == 20
    if failing == "register":
        first_accepted = next(i for i, line in enumerate(rcpts) if "%" in line)
        assert with_token == list(range(first_accepted + 1))
    else:
        assert len(with_token) == 20
    messages = [line for line in transcript.lines if line.startswith(">>> (test message:")]
    assert len(messages) == {"register": 0, "wait": 3}[failing]
    assert transcript.lines[-3:-1] == ["System appeared to accept 3 relay attempts", UNAVAILABLE]
    assert transcript.lines[-1].endswith(
        "only delivery proves relaying, and delivery confirmation is off"
    )
    # The tokens it holds are forgotten all the same, even one whose registration "failed".
    assert len(registry) == 0


async def test_an_arrival_before_the_registry_is_lost_still_confirms(
    start_server: StartServer,
) -> None:
    transcript = await run_with(UnreachableRegistry("wait after an arrival"), start_server)
    summary = transcript.summary
    assert summary is not None and summary.verdict == "relayed"
    assert transcript.lines[-3:] == [
        "Relay confirmed: 1 of 3 test messages arrived (Test 8)",
        UNAVAILABLE,
        "Note: this is an open relay: it passed test messages on to a third party's domain; "
        "the user guide shows how to close it",
    ]
