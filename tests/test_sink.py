import asyncio
import logging
import smtplib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import structlog

from relayprobe.canary import InMemoryRegistry
from relayprobe.sink import MAX_RECIPIENTS, CanarySink

DOMAIN = "relaytest.example"
TOKEN = "k3x7q2ab7z"
OTHER_TOKEN = "m4n5p6q7r2"
# Every wait on the sink is bounded by this; the tests normally finish in milliseconds.
WAIT = 5.0

StartSink = Callable[..., Coroutine[Any, Any, tuple[CanarySink, int]]]


def address(token: str, domain: str = DOMAIN) -> str:
    return f"nobody-{token}@{domain}"


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
    async def connect(cls, port: int) -> tuple["Client", int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
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

    async def command(self, line: str) -> int:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def send_message(
        self, recipients: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n"
    ) -> int:
        assert await self.command("EHLO client.test") == 250
        assert await self.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        for recipient in recipients:
            assert await self.command(f"RCPT TO:<{recipient}>") == 250
        assert await self.command("DATA") == 354
        self.writer.write(body + b".\r\n")
        return await self.reply()

    async def closed_by_sink(self) -> bool:
        """True when the sink hangs up within WAIT; what it sends meanwhile is dropped."""
        async with asyncio.timeout(WAIT):
            while await self.reader.read(4096):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


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
    registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, banner = await Client.connect(port)
    assert banner == 220
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(OTHER_TOKEN)}>") == 550
    assert await client.command(f"RCPT TO:<{address(TOKEN, 'other.example')}>") == 550
    assert await client.command(f"RCPT TO:<postmaster@{DOMAIN}>") == 550
    assert await client.command(f'RCPT TO:<"{address(TOKEN)}">') == 550
    assert await client.command("DATA") == 503
    assert registry.is_pending(TOKEN)
    await client.close()


async def test_pending_token_is_accepted_once(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    registry.register(TOKEN, ttl=60)
    delivered: list[None] = []
    sink, port = await start_sink(registry=registry, on_delivery=lambda: delivered.append(None))
    client, _ = await Client.connect(port)
    assert await client.send_message([address(TOKEN)]) == 250
    assert not registry.is_pending(TOKEN)
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
    registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert await client.send_message([f"@mx.example.com:{address(TOKEN)}"]) == 250
    assert not registry.is_pending(TOKEN)
    await client.close()


async def test_expired_token_gets_550(start_sink: StartSink) -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    registry.register(TOKEN, ttl=30)
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
    registry.register(TOKEN, ttl=60)
    registry.register(OTHER_TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    seen: list[tuple[str, float]] = []
    waiting = asyncio.create_task(
        registry.wait(
            [TOKEN, OTHER_TOKEN],
            timeout=WAIT,
            on_arrival=lambda token, after_s: seen.append((token, after_s)),
        )
    )
    clock.now += 2.5

    def deliver() -> dict[str, tuple[int, bytes]]:
        # local_hostname: smtplib would otherwise ask socket.getfqdn(), a DNS lookup.
        with smtplib.SMTP("127.0.0.1", port, local_hostname="relay.test", timeout=WAIT) as smtp:
            return smtp.sendmail(
                "spamtest@mail.example.com",
                [address(TOKEN), address(OTHER_TOKEN)],
                b"Subject: relayprobe relay test\r\n\r\n.leading dot\r\n",
            )

    assert await asyncio.to_thread(deliver) == {}
    assert await waiting == {TOKEN, OTHER_TOKEN}
    assert sorted(seen) == [(TOKEN, 2.5), (OTHER_TOKEN, 2.5)]


async def test_waiter_gets_the_partial_set_at_its_timeout(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    registry.register(TOKEN, ttl=60)
    registry.register(OTHER_TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    waiting = asyncio.create_task(
        registry.wait([TOKEN, OTHER_TOKEN], timeout=0.3, on_arrival=lambda token, after_s: None)
    )
    client, _ = await Client.connect(port)
    assert await client.send_message([address(TOKEN)]) == 250
    await client.close()
    assert await waiting == {TOKEN}
    assert registry.is_pending(OTHER_TOKEN)


async def test_oversize_message_gets_552_and_proves_nothing(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    registry.register(TOKEN, ttl=60)
    sink, port = await start_sink(registry=registry, max_message_bytes=1024)
    client, _ = await Client.connect(port)
    body = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    assert await client.send_message([address(TOKEN)], body * 20) == 552
    assert registry.is_pending(TOKEN)
    assert sink.deliveries == 0
    assert await client.command("MAIL FROM:<spamtest@mail.example.com> SIZE=2000") == 552
    await client.close()


async def test_recipients_per_message_are_capped(start_sink: StartSink) -> None:
    registry = InMemoryRegistry()
    registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    for _ in range(MAX_RECIPIENTS):
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 452
    await client.close()


async def test_connections_beyond_the_cap_get_421(start_sink: StartSink) -> None:
    sink, port = await start_sink(max_connections=2)
    first, first_banner = await Client.connect(port)
    second, second_banner = await Client.connect(port)
    assert (first_banner, second_banner) == (220, 220)
    refused, refusal = await Client.connect(port)
    assert refusal == 421
    assert await refused.closed_by_sink()
    await first.close()
    async with asyncio.timeout(WAIT):
        while sink.connections > 1:
            await asyncio.sleep(0.01)
    third, third_banner = await Client.connect(port)
    assert third_banner == 220
    for client in (second, third, refused):
        await client.close()


async def test_idle_connection_is_closed(start_sink: StartSink) -> None:
    _, port = await start_sink(idle_timeout=0.2)
    client, _ = await Client.connect(port)
    assert await client.closed_by_sink()
    await client.close()


async def test_busy_connection_is_closed_at_its_total_time(start_sink: StartSink) -> None:
    _, port = await start_sink(idle_timeout=WAIT, connection_timeout=0.3)
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
    registry.register(TOKEN, ttl=60)
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
    assert registry.is_pending(TOKEN)
    assert asyncio.all_tasks() == tasks_before


async def test_handler_failure_gets_451_and_the_session_goes_on(start_sink: StartSink) -> None:
    class BrokenRegistry(InMemoryRegistry):
        def is_pending(self, token: str) -> bool:
            raise KeyError(token)

    _, port = await start_sink(registry=BrokenRegistry())
    client, _ = await Client.connect(port)
    assert await client.command("EHLO client.test") == 250
    assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
    assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 451
    assert await client.command("NOOP") == 250
    await client.close()


async def test_nothing_received_reaches_the_logs_raw(
    start_sink: StartSink, caplog: pytest.LogCaptureFixture
) -> None:
    registry = InMemoryRegistry()
    registry.register(TOKEN, ttl=60)
    _, port = await start_sink(registry=registry)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as structured:
        client, _ = await Client.connect(port)
        assert await client.command("EHLO \x1b[2Jevil") == 250
        assert await client.command("MAIL FROM:<\x1b]0;owned\x07@evil.example>") // 100 == 5
        assert await client.command("MAIL FROM:<spamtest@mail.example.com>") == 250
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
        assert await client.command("DATA") == 354
        client.writer.write(b"Subject: \x1b[31mred\r\n\r\n\x1b[2J\r\n.\r\n")
        assert await client.reply() == 250
        assert await client.command("\x1b[2J") == 500
        await client.close()
    assert structured == [{"event": "canary_delivery", "tokens": [TOKEN], "log_level": "info"}]
    assert not any("\x1b" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "option",
    ["max_message_bytes", "max_connections", "idle_timeout", "connection_timeout"],
)
def test_options_must_be_positive(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        options: dict[str, Any] = {option: 0}
        CanarySink(registry=InMemoryRegistry(), domain=DOMAIN, **options)


def test_the_sink_needs_a_domain() -> None:
    with pytest.raises(ValueError, match="domain"):
        CanarySink(registry=InMemoryRegistry(), domain=".")
