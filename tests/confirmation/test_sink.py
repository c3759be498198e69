import asyncio
import contextlib
import datetime
import logging
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from benchmarks import sink_flood
from relayprobe.confirmation import sink as sink_module
from relayprobe.confirmation.canary import CanaryRegistry, InMemoryRegistry, RegistryUnavailable
from relayprobe.confirmation.sink import MAX_RECIPIENTS, CanarySink
from relayprobe.confirmation.sinklimits import SinkLimits
from relayprobe.confirmation.sinktls import sink_tls_context
from tests.infra.command import relayprobe
from tests.infra.haproxy import free_port

DOMAIN = "relaytest.example"
TOKEN = "k3x7q2ab7z"
OTHER_TOKEN = "m4n5p6q7r2"
# Every wait on the sink is bounded by this; the tests normally finish in milliseconds.
WAIT = 5.0

StartSink = Callable[..., Coroutine[Any, Any, tuple[CanarySink, int]]]


def address(token: str, domain: str = DOMAIN) -> str:
    return f"nobody-{token}@{domain}"


async def proof_message(registry: CanaryRegistry, *tokens: str, extra: bytes = b"") -> bytes:
    """A message that went through the tested server: it carries the tokens' secrets."""
    checks = [f"Check: {await registry.message_secret(t)}\r\n".encode() for t in tokens]
    return b"Subject: relayprobe relay test\r\n\r\n" + extra + b"".join(checks)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Client:
    """A raw SMTP client: every byte it sends is the test's choice."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> tuple["Client", int]:
        """Connect from `source` (any of 127/8 is local) and read the greeting."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> int:
        """The code of the next reply, all its lines read."""
        async with asyncio.timeout(WAIT):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("the sink closed the connection")
                if line[3:4] != b"-":
                    return int(line[:3])

    async def ehlo(self) -> list[bytes]:
        """The keywords of the EHLO reply, after the greeting line."""
        self.writer.write(b"EHLO client.test\r\n")
        keywords = []
        async with asyncio.timeout(WAIT):
            while (line := await self.reader.readline())[3:4] == b"-":
                keywords.append(line[4:].strip())
        assert line[:3] == b"250", line
        return [*keywords[1:], line[4:].strip()]

    async def starttls(self) -> ssl.SSLObject:
        """STARTTLS as a sending MTA does it: no verification (RFC 7435)."""
        assert await self.command("STARTTLS") == 220
        async with asyncio.timeout(WAIT):
            await self.writer.start_tls(unverified_context())
        tls: ssl.SSLObject = self.writer.get_extra_info("ssl_object")
        return tls

    async def command(self, line: str) -> int:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def send_message(self, recipients: list[str], body: bytes) -> int:
        assert await self.command("EHLO client.test") == 250
        assert await self.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        for recipient in recipients:
            assert await self.command(f"RCPT TO:<{recipient}>") == 250
        assert await self.command("DATA") == 354
        self.writer.write(body + b".\r\n")
        return await self.reply()

    async def closed_by_sink(self) -> bool:
        """True when the sink hangs up within WAIT (a reset, when it closes with our data
        unread); what it sends meanwhile is dropped."""
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionResetError):
                while await self.reader.read(4096):
                    pass
        return True

    async def close(self) -> None:
        self.writer.close()
        # A reset by the sink is already known; closing after it is no error.
        with contextlib.suppress(ConnectionResetError):
            await self.writer.wait_closed()


def unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def wait_for_no_connections(sink: CanarySink, *, within: float) -> None:
    """Return once the sink holds no connection; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while sink.connections:
            await asyncio.sleep(0.01)


@pytest.fixture
async def start_sink() -> AsyncIterator[StartSink]:
    sinks: list[CanarySink] = []

    async def start(**options: Any) -> tuple[CanarySink, int]:
        options.setdefault("registry", InMemoryRegistry())
        sink = CanarySink(domain=DOMAIN, hostname="sink.test", **options)
        sinks.append(sink)
        host, port = await sink.start("127.0.0.1", 0)
        assert host == "127.0.0.1"
        return sink, port

    yield start
    for sink in sinks:
        await sink.stop()


async def test_unknown_token_and_wrong_domain_get_550(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry, limits=SinkLimits(max_unknown_recipients=4))
    client, banner = await Client.connect(port)
    assert banner == 220
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(OTHER_TOKEN)}>") == 550
    assert await client.command(f"RCPT TO:<{address(TOKEN, 'other.example')}>") == 550
    assert await client.command(f"RCPT TO:<postmaster@{DOMAIN}>") == 550
    assert await client.command(f'RCPT TO:<"{address(TOKEN)}">') == 550
    assert await client.command("DATA") == 503
    assert await registry.is_pending(TOKEN)
    await client.close()


async def test_pending_token_is_accepted_once(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    delivered: list[None] = []
    sink, port = await start_sink(registry=registry, on_delivery=lambda: delivered.append(None))
    client, _ = await Client.connect(port)
    assert await client.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert not await registry.is_pending(TOKEN)
    assert sink.deliveries == 1
    assert delivered == [None]
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 550
    assert await client.command(f"RCPT TO:<{address(TOKEN).upper()}>") == 550
    assert await client.command("QUIT") == 221
    await client.close()


async def test_source_route_is_ignored(start_sink: StartSink) -> None:
    """RFC 5321 C: a relay may pass on `<@host:user@domain>`; the route is to be ignored."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    route = f"@mx.example.com:{address(TOKEN)}"
    assert await client.send_message([route], await proof_message(registry, TOKEN)) == 250
    assert not await registry.is_pending(TOKEN)
    await client.close()


async def test_expired_token_gets_550(start_sink: StartSink) -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    await registry.register(TOKEN, ttl=30)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    clock.now += 30
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 550
    await client.close()


async def test_arrival_by_a_plain_smtp_client_wakes_the_waiting_test(
    start_sink: StartSink,
) -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    await registry.register(TOKEN, ttl=60)
    await registry.register(OTHER_TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    seen: list[tuple[str, float, str]] = []
    waiting = asyncio.create_task(
        registry.wait(
            [TOKEN, OTHER_TOKEN],
            timeout=WAIT,
            on_arrival=lambda token, after_s, source: seen.append((token, after_s, source)),
        )
    )
    clock.now += 2.5
    message = await proof_message(registry, TOKEN, OTHER_TOKEN, extra=b".leading dot\r\n")

    def deliver() -> dict[str, tuple[int, bytes]]:
        # local_hostname: smtplib would otherwise ask socket.getfqdn(), a DNS lookup.
        with smtplib.SMTP("127.0.0.1", port, local_hostname="relay.test", timeout=WAIT) as smtp:
            return smtp.sendmail(
                "spamtest@mail.example.com", [address(TOKEN), address(OTHER_TOKEN)], message
            )

    assert await asyncio.to_thread(deliver) == {}
    assert await waiting == {TOKEN, OTHER_TOKEN}
    assert sorted(seen) == [(TOKEN, 2.5, "127.0.0.1"), (OTHER_TOKEN, 2.5, "127.0.0.1")]


async def test_waiter_gets_the_partial_set_at_its_timeout(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    await registry.register(OTHER_TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    waiting = asyncio.create_task(
        registry.wait(
            [TOKEN, OTHER_TOKEN], timeout=0.3, on_arrival=lambda token, after_s, source: None
        )
    )
    client, _ = await Client.connect(port)
    assert await client.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    await client.close()
    assert await waiting == {TOKEN}
    assert await registry.is_pending(OTHER_TOKEN)


async def test_oversize_message_gets_552_and_proves_nothing(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry, limits=SinkLimits(max_message_bytes=1024))
    client, _ = await Client.connect(port)
    body = await proof_message(registry, TOKEN, extra=(b"x" * 70 + b"\r\n") * 20)
    assert await client.send_message([address(TOKEN)], body) == 552
    assert await client.closed_by_sink()
    assert await registry.is_pending(TOKEN)
    assert sink.deliveries == 0
    announced, _ = await Client.connect(port)
    assert await announced.command("EHLO client.test") == 250
    assert await announced.command("MAIL FROM:<spamtest@mail.example.com> SIZE=2000") == 552
    for each in (client, announced):
        await each.close()


async def test_a_message_past_the_limit_is_cut_off_at_once(start_sink: StartSink) -> None:
    """Finding 1: the sink once read on to the final dot, however much came, before its 552."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry, limits=SinkLimits(max_message_bytes=4096))
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    assert await client.command("DATA") == 354
    # No final dot: a stream that would go on for ever.
    client.writer.write((b"A" * 998 + b"\r\n") * 8)
    assert await client.reply() == 552
    assert await client.closed_by_sink()
    assert await registry.is_pending(TOKEN)
    assert sink.deliveries == 0
    await client.close()


async def test_a_line_past_the_limit_ends_the_connection(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    assert await client.command("DATA") == 354
    client.writer.write(b"A" * 2000 + b"\r\n.\r\n")
    assert await client.reply() == 500
    assert await client.closed_by_sink()
    assert await registry.is_pending(TOKEN)
    await client.close()


async def test_message_bytes_are_paced_per_prefix(start_sink: StartSink) -> None:
    """Finding 1: one prefix streaming DATA once got all the reading the sink could do."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    await registry.register(OTHER_TOKEN, ttl=60)
    limits = SinkLimits(message_bytes_per_second=8000)
    _, port = await start_sink(registry=registry, limits=limits)
    loop = asyncio.get_running_loop()
    # 12,000 bytes: 8,000 at once, the rest at 8,000 a second.
    big = await proof_message(registry, TOKEN, extra=(b"x" * 98 + b"\r\n") * 120)
    streamer, _ = await Client.connect(port, "127.0.0.2")
    started = loop.time()
    assert await streamer.send_message([address(TOKEN)], big) == 250
    paced = loop.time() - started
    assert paced > 0.4
    # Another prefix has a budget of its own: its message is not held back.
    relay, _ = await Client.connect(port, "127.0.1.2")
    started = loop.time()
    assert (
        await relay.send_message([address(OTHER_TOKEN)], await proof_message(registry, OTHER_TOKEN))
        == 250
    )
    assert loop.time() - started < paced / 2
    for client in (streamer, relay):
        await client.close()


async def test_recipients_per_message_are_capped(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    for _ in range(MAX_RECIPIENTS):
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 452
    await client.close()


async def test_connections_beyond_the_cap_get_421(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    limits = SinkLimits(max_connections=2, reserved_connections=1)
    sink, port = await start_sink(registry=registry, limits=limits)
    # Each from its own /24: the share kept for new sources does not come into it.
    first, first_banner = await Client.connect(port, "127.0.1.1")
    second, second_banner = await Client.connect(port, "127.0.2.1")
    assert (first_banner, second_banner) == (220, 220)
    # Both delivering: neither can be evicted.
    for client in (first, second):
        assert await client.command("EHLO client.test") == 250
        assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    refused, refusal = await Client.connect(port, "127.0.3.1")
    assert refusal == 421
    assert await refused.closed_by_sink()
    assert sink.refused == {"capacity": 1}
    await first.close()
    async with asyncio.timeout(WAIT):
        while sink.connections > 1:
            await asyncio.sleep(0.01)
    third, third_banner = await Client.connect(port, "127.0.3.1")
    assert third_banner == 220
    for client in (second, third, refused):
        await client.close()


async def test_a_sink_held_full_by_idle_connections_makes_room_for_a_relay(
    start_sink: StartSink,
) -> None:
    """Finding 5: 100 idle connections from 24 prefixes, every share used, once kept a relay
    out."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    crowded = [f"127.8.{n}.{a}" for n in range(4) for a in (1, 2) for _ in range(10)]
    lone = [f"127.8.{10 + n}.1" for n in range(20)]
    idle = [await Client.connect(port, source) for source in crowded + lone]
    assert [banner for _, banner in idle] == [220] * 100
    relay, banner = await Client.connect(port, "127.9.0.1")
    assert banner == 220
    assert await relay.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert not await registry.is_pending(TOKEN)
    assert (sink.evicted, sink.refused) == (1, {})
    # The one evicted: the oldest connection of a prefix holding 20.
    oldest, _ = idle[0]
    assert await oldest.reply() == 421
    assert await oldest.closed_by_sink()
    for client in [relay, *(client for client, _ in idle)]:
        await client.close()


async def test_a_connection_must_name_a_test_recipient_in_time(start_sink: StartSink) -> None:
    """Finding 5: kept alive with NOOP, an idle connection once held its slot for a minute."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry, limits=SinkLimits(recipient_timeout=0.3))
    idle, _ = await Client.connect(port, "127.0.0.2")
    relay, _ = await Client.connect(port, "127.0.1.2")
    assert await relay.command("EHLO relay.test") == 250
    assert await relay.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await relay.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (code := await idle.command("NOOP")) == 250 and loop.time() - started < WAIT:
        await asyncio.sleep(0.05)
    assert code == 421
    assert 0.2 < loop.time() - started < 2
    assert await idle.closed_by_sink()
    # The relay, as long connected, is not cut off.
    assert await relay.command("NOOP") == 250
    assert sink.connections == 1
    for client in (idle, relay):
        await client.close()


async def test_idle_connection_is_closed(start_sink: StartSink) -> None:
    _, port = await start_sink(limits=SinkLimits(idle_timeout=0.2))
    client, _ = await Client.connect(port)
    assert await client.closed_by_sink()
    await client.close()


async def test_busy_connection_is_closed_at_its_total_time(start_sink: StartSink) -> None:
    _, port = await start_sink(limits=SinkLimits(idle_timeout=WAIT, connection_timeout=0.3))
    client, _ = await Client.connect(port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError):
        for _ in range(int(WAIT / 0.02)):
            assert await client.command("NOOP") == 250
            await asyncio.sleep(0.02)
    assert loop.time() - started < 2
    await client.close()


async def test_hostile_clients_leave_no_tasks_behind() -> None:
    tasks_before = asyncio.all_tasks()
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink = CanarySink(registry=registry, domain=DOMAIN, hostname="sink.test")
    _, port = await sink.start("127.0.0.1", 0)

    garbage, _ = await Client.connect(port)
    garbage.writer.write(bytes(range(256)) * 4 + b"\r\n" + b"\x00\xff" * 5000)
    await garbage.writer.drain()
    await garbage.close()

    half_closed, _ = await Client.connect(port)
    half_closed.writer.write(b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\n")
    half_closed.writer.write_eof()
    assert await half_closed.closed_by_sink()
    await half_closed.close()

    mid_data, _ = await Client.connect(port)
    assert await mid_data.command("EHLO client.test") == 250
    assert await mid_data.command("MAIL FROM:<a@b.example>") == 250
    assert await mid_data.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    assert await mid_data.command("DATA") == 354
    mid_data.writer.write(b"Subject: cut short\r\n\r\nno end")
    await mid_data.close()

    bogus, _ = await Client.connect(port)
    for _ in range(5):
        bogus.writer.write(b"XYZZY\r\n")
    assert await bogus.closed_by_sink()
    await bogus.close()

    left_open, _ = await Client.connect(port)
    assert await left_open.command("EHLO client.test") == 250

    # Accepted by the kernel, maybe not yet by the sink when it stops.
    just_connected = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]

    await sink.stop()
    assert await left_open.closed_by_sink()
    await left_open.close()
    for _, writer in just_connected:
        writer.close()
    assert sink.connections == 0
    assert await registry.is_pending(TOKEN)
    assert asyncio.all_tasks() == tasks_before


async def test_handler_failure_gets_451_and_the_session_goes_on(start_sink: StartSink) -> None:
    class BrokenRegistry(InMemoryRegistry):
        async def is_pending(self, token: str) -> bool:
            raise KeyError(token)

    _, port = await start_sink(registry=BrokenRegistry())
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 451
    assert await client.command("NOOP") == 250
    await client.close()


class StalledRegistry(InMemoryRegistry):
    """A shared registry as the sink sees it while its server is away: the methods named in
    `stalling` raise `failure`, or hang when it is None."""

    def __init__(self, failure: Exception | None) -> None:
        super().__init__()
        self.failure = failure
        self.stalling: set[str] = set()

    async def _stall(self, method: str) -> None:
        if method not in self.stalling:
            return
        if self.failure is not None:
            raise self.failure
        await asyncio.Event().wait()

    async def is_pending(self, token: str) -> bool:
        await self._stall("is_pending")
        return await super().is_pending(token)

    async def message_secret(self, token: str) -> str:
        await self._stall("message_secret")
        return await super().message_secret(token)


@pytest.mark.parametrize("failure", [RegistryUnavailable("no answer"), None])
async def test_a_registry_down_or_hung_gets_451_at_rcpt_and_data(
    start_sink: StartSink, monkeypatch: pytest.MonkeyPatch, failure: Exception | None
) -> None:
    monkeypatch.setattr(sink_module, "REGISTRY_TIMEOUT_S", 0.1)
    registry = StalledRegistry(failure)
    await registry.register(TOKEN, ttl=60)
    message = await proof_message(registry, TOKEN)
    sink, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    with structlog.testing.capture_logs() as logged:
        registry.stalling = {"message_secret"}
        assert await client.send_message([address(TOKEN)], message) == 451
        registry.stalling = {"is_pending"}
        assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        client.writer.write(f"RCPT TO:<{address(TOKEN)}>\r\n".encode())
        assert await client.reader.readline() == (
            b"451 4.3.0 Test registry unavailable, try again later\r\n"
        )
        assert await client.command("RSET") == 250
        # The relay tries again later, and then the message counts; a 451 is no unknown
        # recipient, and no error of the sink's (which would be a 451 too).
        registry.stalling = set()
        assert await client.send_message([address(TOKEN)], message) == 250
    assert [entry["event"] for entry in logged] == ["canary_delivery"]
    assert (sink.deliveries, sink.unproven) == (1, 0)
    await client.close()


async def test_nothing_received_reaches_the_logs_raw(
    start_sink: StartSink, caplog: pytest.LogCaptureFixture
) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as structured:
        client, _ = await Client.connect(port)
        assert await client.command("EHLO \x1b[2Jevil") == 250
        assert await client.command("MAIL FROM:<\x1b]0;owned\x07@evil.example>") // 100 == 5
        assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
        assert await client.command("DATA") == 354
        client.writer.write(
            b"Subject: \x1b[31mred\r\n\r\n\x1b[2J\r\n"
            + f"Check: {await registry.message_secret(TOKEN)}\r\n.\r\n".encode()
        )
        assert await client.reply() == 250
        assert await client.command("\x1b[2J") == 500
        await client.close()
    assert structured == [
        {"event": "canary_delivery", "tokens": [TOKEN], "source": "127.0.0.1", "log_level": "info"}
    ]
    assert not any("\x1b" in record.getMessage() for record in caplog.records)


def test_the_sink_needs_a_domain() -> None:
    with pytest.raises(ValueError, match="domain"):
        CanarySink(registry=InMemoryRegistry(), domain=".")


async def test_idle_connections_from_one_address_leave_room_for_a_relay(
    start_sink: StartSink,
) -> None:
    """Finding 5: with the defaults, 100 idle connections from one host once filled the sink."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    idle: list[Client] = []
    banners: list[int] = []
    for _ in range(100):
        client, banner = await Client.connect(port, "127.0.0.2")
        banners.append(banner)
        idle.append(client)
    relay, banner = await Client.connect(port, "127.0.1.3")
    assert banner == 220
    assert await relay.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert not await registry.is_pending(TOKEN)
    assert banners.count(220) == SinkLimits().max_connections_per_address
    assert sink.refused == {"address": 100 - SinkLimits().max_connections_per_address}
    for client in [*idle, relay]:
        await client.close()


async def test_a_prefix_cannot_take_the_share_kept_for_new_sources(
    start_sink: StartSink,
) -> None:
    limits = SinkLimits(max_connections=6, reserved_connections=2, max_connections_per_prefix=6)
    sink, port = await start_sink(limits=limits)
    # One /24, many addresses: it may hold the cap less the reserve, and no more.
    crowd = [await Client.connect(port, f"127.0.0.{n}") for n in range(2, 8)]
    assert [banner for _, banner in crowd] == [220] * 4 + [421] * 2
    newcomer, banner = await Client.connect(port, "127.0.1.2")
    assert banner == 220
    assert sink.refused == {"capacity": 2}
    for client, _ in [*crowd, (newcomer, banner)]:
        await client.close()


async def test_unknown_recipients_end_the_connection_and_throttle_the_prefix(
    start_sink: StartSink,
) -> None:
    """Finding 6: a flood of wrong RCPTs is cut off per connection, then per prefix."""
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    await registry.register(TOKEN, ttl=600)
    limits = SinkLimits(max_unknown_recipients=3, unknown_recipients_per_minute=10)
    sink, port = await start_sink(registry=registry, limits=limits, clock=clock)

    async def flood(client: Client) -> list[int]:
        """Pipeline 200 unknown recipients; the codes of the replies before the sink hangs up."""
        rcpts = b"".join(f"RCPT TO:<{address(OTHER_TOKEN)}>\r\n".encode() for _ in range(200))
        client.writer.write(b"EHLO flood.test\r\nMAIL FROM:<a@flood.test>\r\n" + rcpts)
        codes = []
        # TimeoutError: a sink that never hangs up answers all 200 and then waits.
        with contextlib.suppress(ConnectionError, TimeoutError):
            while True:
                codes.append(await client.reply())
        return codes

    first, _ = await Client.connect(port, "127.0.0.2")
    assert await flood(first) == [250, 250, 550, 550, 550, 421]
    second, _ = await Client.connect(port, "127.0.0.3")
    assert await flood(second) == [250, 250, 550, 550, 550, 421]
    # 8 of the prefix's 10 spent: 2 more 550s, and the budget is gone.
    third, _ = await Client.connect(port, "127.0.0.4")
    assert await flood(third) == [250, 250, 550, 550, 421]
    # A new connection from the prefix is taken; its first unknown recipient is refused.
    throttled, banner = await Client.connect(port, "127.0.0.5")
    assert banner == 220
    assert await flood(throttled) == [250, 250, 421]
    assert not sink.refused
    # Another prefix is not held up: a relay there delivers.
    relay, banner = await Client.connect(port, "127.0.1.2")
    assert banner == 220
    assert await relay.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    # The budget comes back at 10 a minute.
    clock.now += 6.0
    back, _ = await Client.connect(port, "127.0.0.5")
    assert await flood(back) == [250, 250, 550, 421]
    for client in (first, second, third, throttled, relay, back):
        await client.close()


async def test_a_flooding_neighbour_does_not_keep_a_relay_out(start_sink: StartSink) -> None:
    """Finding 4: a host spending its /24's unknown-recipient budget once got every new
    connection from the /24 refused, so a relay there could deliver nothing."""
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    await registry.register(TOKEN, ttl=600)
    limits = SinkLimits(unknown_recipients_per_minute=3)
    sink, port = await start_sink(registry=registry, limits=limits, clock=clock)
    neighbour, _ = await Client.connect(port, "127.0.0.77")
    assert await neighbour.command("EHLO neighbour.test") == 250
    assert await neighbour.command("MAIL FROM:<a@neighbour.test>") == 250
    for _ in range(3):
        assert await neighbour.command(f"RCPT TO:<{address(OTHER_TOKEN)}>") == 550
    assert await neighbour.command(f"RCPT TO:<{address(OTHER_TOKEN)}>") == 421
    relay, banner = await Client.connect(port, "127.0.0.1")
    assert banner == 220
    assert await relay.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert not await registry.is_pending(TOKEN)
    # The neighbour, back, is taken too, and refused at its first unknown recipient.
    again, banner = await Client.connect(port, "127.0.0.77")
    assert banner == 220
    assert await again.command("EHLO neighbour.test") == 250
    assert await again.command("MAIL FROM:<a@neighbour.test>") == 250
    assert await again.command(f"RCPT TO:<{address(OTHER_TOKEN)}>") == 421
    assert await again.closed_by_sink()
    assert not sink.refused
    for client in (neighbour, relay, again):
        await client.close()


async def test_a_delivery_without_the_secret_is_not_an_arrival(
    start_sink: StartSink,
) -> None:
    """Finding 9: the caller sees its tokens, not their secrets, so it cannot confirm itself."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    seen: list[tuple[str, str]] = []
    waiting = asyncio.create_task(
        registry.wait(
            [TOKEN],
            timeout=WAIT,
            on_arrival=lambda token, after_s, source: seen.append((token, source)),
        )
    )
    # All the caller knows: the token, in the recipient, subject and header of its transcript.
    forged = f"Subject: relayprobe relay test {TOKEN} (Test 8)\r\nX-Relayprobe-Token: {TOKEN}\r\n"
    caller, _ = await Client.connect(port, "127.0.0.2")
    with structlog.testing.capture_logs() as logged:
        code = await caller.send_message([address(TOKEN)], forged.encode() + b"\r\nhi\r\n")
    assert code == 554
    assert await registry.is_pending(TOKEN)
    assert (sink.deliveries, sink.unproven) == (0, 1)
    assert logged == [
        {
            "event": "canary_unproven",
            "tokens": [TOKEN],
            "source": "127.0.0.2",
            "log_level": "warning",
        }
    ]
    # The session goes on, and the real message still counts, with who delivered it.
    relay, _ = await Client.connect(port, "127.0.0.3")
    assert await relay.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert await waiting == {TOKEN}
    assert seen == [(TOKEN, "127.0.0.3")]
    assert (sink.deliveries, sink.unproven) == (1, 1)
    for client in (caller, relay):
        await client.close()


async def test_a_bad_rcpt_flood_leaves_the_event_loop_responsive() -> None:
    """Finding 6: 50 connections pipelining wrong RCPTs once stalled the loop for seconds.

    The flood runs in another process for 2 s; this loop runs the sink, a 10 ms ticker and a
    relay delivering every 0.2 s. What bounds the loop's work is asserted: the replies the sink
    gave, all connections together, stay within its reply rate, and the relay still delivers.
    The lag itself is timing, measured by benchmarks.sink_flood (docs/performance.md), and only
    printed here.
    """
    seconds = 2.0
    report = await sink_flood.measure(connections=50, seconds=seconds, spread="prefixes")
    print(*report.lines(), sep="\n")
    assert report.flood["reply_421"] > 0
    answered = sum(count for kind, count in report.flood.items() if kind.startswith("reply_"))
    # The bucket's burst is one second's worth, and the flooders' last replies may land late.
    assert answered <= SinkLimits().replies_per_second * (seconds + 2)
    assert report.failed_deliveries == 0 and report.deliveries_s


# --- STARTTLS -------------------------------------------------------------------------------------


def peer_certificate(tls: ssl.SSLObject) -> x509.Certificate:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(name: x509.Name) -> str:
    [attribute] = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


async def test_plaintext_delivery_works_with_starttls_offered(start_sink: StartSink) -> None:
    """Most relays deliver in plaintext: STARTTLS is offered, never required."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert b"STARTTLS" in await client.ehlo()
    assert await client.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert sink.deliveries == 1
    assert not await registry.is_pending(TOKEN)
    await client.close()


async def test_a_relay_delivers_over_starttls_to_the_throwaway_certificate(
    start_sink: StartSink,
) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert b"STARTTLS" in await client.ehlo()
    tls = await client.starttls()
    assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    # RFC 3207: a new EHLO, which offers neither STARTTLS again nor AUTH (the sink has no
    # accounts).
    keywords = await client.ehlo()
    assert not any(keyword.startswith((b"STARTTLS", b"AUTH")) for keyword in keywords)
    assert await client.command("STARTTLS") == 503
    assert await client.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert sink.deliveries == 1
    assert not await registry.is_pending(TOKEN)
    assert await client.command("QUIT") == 221
    await client.close()
    await wait_for_no_connections(sink, within=WAIT)

    certificate = peer_certificate(tls)
    assert common_name(certificate.subject) == "sink.test"
    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)
    alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert alternative.value.get_values_for_type(x509.DNSName) == ["sink.test"]
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc
    validity = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert validity == datetime.timedelta(days=365)


async def test_smtplib_delivers_over_starttls(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry)
    message = await proof_message(registry, TOKEN)

    def deliver() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="relay.test", timeout=WAIT) as smtp:
            smtp.starttls(context=unverified_context())
            return smtp.sendmail("spamtest@mail.example.com", [address(TOKEN)], message)

    assert await asyncio.to_thread(deliver) == {}
    assert sink.deliveries == 1


def operator_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """An operator's certificate and key (RSA, unlike the throwaway's EC), as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_the_operators_certificate_is_offered(start_sink: StartSink, tmp_path: Path) -> None:
    cert_file, key_file = operator_certificate(tmp_path, "mx.operator.test")
    tls = sink_tls_context(hostname="sink.test", cert_file=str(cert_file), key_file=str(key_file))
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry, tls=tls)
    client, _ = await Client.connect(port)
    await client.ehlo()
    certificate = peer_certificate(await client.starttls())
    assert common_name(certificate.subject) == "mx.operator.test"
    assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
    assert await client.send_message([address(TOKEN)], await proof_message(registry, TOKEN)) == 250
    assert sink.deliveries == 1
    await client.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_is_refused(start_sink: StartSink) -> None:
    sink, port = await start_sink()
    client, _ = await Client.connect(port)
    await client.ehlo()
    assert await client.command("STARTTLS") == 220
    old = unverified_context()
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level would not even let the client offer TLS 1.1.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with asyncio.timeout(WAIT):
            await client.writer.start_tls(old)
    await wait_for_no_connections(sink, within=WAIT)
    await client.close()


# Never bound: the certificate is checked first.
SINK_LISTEN = f"127.0.0.1:{free_port('127.0.0.1')}"


@pytest.mark.parametrize("problem", ["missing", "mismatched", "a directory", "only one"])
async def test_a_bad_certificate_fails_the_start_in_one_line(tmp_path: Path, problem: str) -> None:
    cert_file, key_file = operator_certificate(tmp_path, "mx.operator.test")
    _, other_key = operator_certificate(tmp_path, "other.operator.test")
    files = {
        "missing": ["--sink-tls-cert", tmp_path / "none.crt", "--sink-tls-key", key_file],
        "mismatched": ["--sink-tls-cert", str(cert_file), "--sink-tls-key", str(other_key)],
        "a directory": ["--sink-tls-cert", str(tmp_path), "--sink-tls-key", str(key_file)],
        "only one": ["--sink-tls-cert", str(cert_file)],
    }[problem]
    done = await relayprobe("check", "127.0.0.1", "--sink-listen", SINK_LISTEN, *map(str, files))
    expected = {
        "missing": f"canary sink: cannot read {tmp_path / 'none.crt'}: No such file or directory",
        "mismatched": (
            f"canary sink: {cert_file} and {other_key}: the key does not belong to the certificate"
        ),
        "a directory": f"canary sink: cannot read {tmp_path}: Is a directory",
        "only one": (
            "sink_tls_cert and sink_tls_key: give both, or neither for a throwaway certificate"
        ),
    }[problem]
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"relayprobe check: {expected}\n")


async def test_a_key_that_is_not_pem_fails_the_start_in_one_line(tmp_path: Path) -> None:
    cert_file, _ = operator_certificate(tmp_path, "mx.operator.test")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    done = await relayprobe(
        *("check", "127.0.0.1", "--sink-listen", SINK_LISTEN),
        *("--sink-tls-cert", str(cert_file), "--sink-tls-key", str(garbage)),
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"relayprobe check: canary sink: {cert_file} and {garbage}: expected a PEM certificate "
        "chain and its PEM private key\n",
    )


async def test_a_client_that_stalls_after_starttls_is_dropped_in_time() -> None:
    tasks_before = asyncio.all_tasks()
    limits = SinkLimits(idle_timeout=0.3)
    sink = CanarySink(
        registry=InMemoryRegistry(), domain=DOMAIN, hostname="sink.test", limits=limits
    )
    _, port = await sink.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()

    stalled, _ = await Client.connect(port)
    await stalled.ehlo()
    assert await stalled.command("STARTTLS") == 220
    started = loop.time()
    assert await stalled.closed_by_sink()
    await wait_for_no_connections(sink, within=WAIT)
    assert 0.2 < loop.time() - started < 2

    # Not TLS after the 220.
    garbage, _ = await Client.connect(port)
    assert await garbage.command("STARTTLS") == 220
    garbage.writer.write(b"MAIL FROM:<a@b.example>\r\n" * 10)
    assert await garbage.closed_by_sink()
    await wait_for_no_connections(sink, within=WAIT)

    # Hanging up in the middle of the handshake.
    hung_up, _ = await Client.connect(port)
    assert await hung_up.command("STARTTLS") == 220
    await hung_up.close()
    await wait_for_no_connections(sink, within=WAIT)

    await sink.stop()
    for client in (stalled, garbage):
        await client.close()
    assert asyncio.all_tasks() == tasks_before


async def test_the_limits_hold_over_tls(start_sink: StartSink) -> None:
    """Deadlines and hang-ups speak TLS once it is on, and free the slot at once."""
    registry = InMemoryRegistry()
    await registry.register(TOKEN, ttl=60)
    limits = SinkLimits(recipient_timeout=0.3, idle_timeout=0.5)
    sink, port = await start_sink(registry=registry, limits=limits)
    idle, _ = await Client.connect(port)
    await idle.ehlo()
    await idle.starttls()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (code := await idle.command("NOOP")) == 250 and loop.time() - started < WAIT:
        await asyncio.sleep(0.05)
    assert code == 421
    await wait_for_no_connections(sink, within=1)

    # A relay that named a test's recipient and then went quiet: the idle timeout.
    quiet, _ = await Client.connect(port)
    await quiet.ehlo()
    await quiet.starttls()
    await quiet.ehlo()
    assert await quiet.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await quiet.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    started = loop.time()
    await wait_for_no_connections(sink, within=2)
    assert loop.time() - started > 0.3
    for client in (idle, quiet):
        await client.close()


async def test_a_paced_reply_to_starttls_does_not_lose_the_handshake(
    start_sink: StartSink,
) -> None:
    """Replies beyond the reply rate wait; the wait must come before the 220, or the client's
    handshake, sent on the 220, would be read as plaintext and lost."""
    # Two replies at once, then two a second: the greeting and the NOOP take the burst.
    _, port = await start_sink(limits=SinkLimits(replies_per_second=2))
    client, _ = await Client.connect(port)
    assert await client.command("NOOP") == 250
    tls = await client.starttls()
    assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    await client.close()


async def test_a_tls_client_that_ignores_the_close_is_not_waited_for(
    start_sink: StartSink,
) -> None:
    """asyncio's TLS layer waits up to 30 s for the peer's close_notify; the sink does not."""
    sink, port = await start_sink(limits=SinkLimits(idle_timeout=0.3))
    client, _ = await Client.connect(port)
    assert await client.command("STARTTLS") == 220
    # A handshake by hand, after which the client reads nothing, so answers no close_notify.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified_context().wrap_bio(incoming, outgoing)
    async with asyncio.timeout(WAIT):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                client.writer.write(outgoing.read())
                incoming.write(await client.reader.read(65536))
    client.writer.write(outgoing.read())
    await wait_for_no_connections(sink, within=2)
    await client.close()
