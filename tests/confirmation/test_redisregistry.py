"""The Redis registry against a real redis-server on loopback: two instances on one Redis stand
for two replicas. Faults are real too: the server stopped (down) or paused with SIGSTOP (hung)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from redis.asyncio import Redis

from relayprobe.confirmation.canary import SECRET_HEX_CHARS, RegistryUnavailable
from relayprobe.confirmation.redisregistry import RETRY_S, RedisRegistry
from relayprobe.confirmation.sink import CanarySink
from relayprobe.fakemx import FakeMailServer, relays_everything
from relayprobe.relaytest.engine import run_relay_test
from relayprobe.relaytest.options import RelayTestOptions
from relayprobe.reports.render import Transcript
from tests.confirmation.test_sink import DOMAIN, Client, address, proof_message
from tests.conftest import StartServer
from tests.infra.dataservers import RedisServer

TOKEN = "k3x7q2ab7z"
OTHER_TOKEN = "m4n5p6q7r2"
SOURCE = "192.0.2.25"
TIMEOUT_S = 0.2
# What a bounded call may take beyond its timeout: scheduling, not waiting.
MARGIN_S = 0.3
# Every wait for something that should happen at once; the tests normally take milliseconds.
WAIT = 5.0
_prefixes = itertools.count()


class Replicas:
    """RedisRegistry instances on one Redis, as the replicas of one service would have, each
    counting its failures in `unavailable`; closed at the end of the block."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"test{next(_prefixes)}:"
        self.unavailable: list[str] = []
        self.started: list[RedisRegistry] = []

    async def __aenter__(self) -> Replicas:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for registry in self.started:
            await registry.aclose()

    async def start(self) -> RedisRegistry:
        registry = RedisRegistry(
            self.url,
            timeout_s=TIMEOUT_S,
            key_prefix=self.prefix,
            on_unavailable=self.unavailable.append,
        )
        self.started.append(registry)
        await registry.start()
        return registry


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    async with Replicas(redis_server.url) as made:
        yield made


@pytest.fixture
async def replicas_of_own(own_redis: RedisServer) -> AsyncIterator[Replicas]:
    async with Replicas(own_redis.url) as made:
        yield made


class Arrivals:
    """An `on_arrival` that keeps what it is told, and when."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, str]] = []
        self.at: list[float] = []

    def __call__(self, token: str, after_s: float, source: str) -> None:
        self.seen.append((token, after_s, source))
        self.at.append(time.monotonic())


async def eventually(condition: Any, *, within: float = WAIT) -> None:
    """Return once `condition()` is true; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def bounded(call: Awaitable[Any]) -> float:
    """How long `call` took to raise `RegistryUnavailable`."""
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable):
        await call
    return time.monotonic() - started


# --- one replica ----------------------------------------------------------------------------------


async def test_a_registered_token_is_pending_until_it_arrives_once(replicas: Replicas) -> None:
    registry = await replicas.start()
    assert registry.healthy and registry.last_error is None
    assert not await registry.is_pending(TOKEN)
    assert await registry.message_secret(TOKEN) is None
    await registry.register(TOKEN, ttl=60)
    assert await registry.is_pending(TOKEN)
    assert await registry.mark_arrived(TOKEN, source=SOURCE)
    assert not await registry.is_pending(TOKEN)
    assert not await registry.mark_arrived(TOKEN, source=SOURCE)
    assert not await registry.mark_arrived(OTHER_TOKEN, source=SOURCE)
    assert replicas.unavailable == []


async def test_secrets_are_random_per_token_and_the_same_on_every_replica(
    replicas: Replicas,
) -> None:
    a, b = await replicas.start(), await replicas.start()
    await a.register(TOKEN, ttl=60)
    await a.register(OTHER_TOKEN, ttl=60)
    secret = await a.message_secret(TOKEN)
    assert secret is not None and re.fullmatch(f"[0-9a-f]{{{SECRET_HEX_CHARS}}}", secret)
    assert await b.message_secret(TOKEN) == secret
    assert await a.message_secret(OTHER_TOKEN) not in (None, secret)
    # Registered again, a token gets a fresh secret and is pending again.
    assert await a.mark_arrived(TOKEN, source=SOURCE)
    await a.register(TOKEN, ttl=60)
    assert await b.message_secret(TOKEN) not in (None, secret)
    assert await b.is_pending(TOKEN)


async def test_a_malformed_secret_in_redis_is_no_secret(replicas: Replicas) -> None:
    """An empty or odd secret would prove every message or break the sink's check."""
    registry = await replicas.start()
    await registry.register(TOKEN, ttl=60)
    async with Redis.from_url(replicas.url) as direct:
        for bad in ("", "short", "X" * SECRET_HEX_CHARS, "\u00e9" * SECRET_HEX_CHARS):
            await direct.hset(f"{replicas.prefix}canary:{TOKEN}", "secret", bad)
            assert await registry.message_secret(TOKEN) is None


async def test_forget_drops_tokens(replicas: Replicas) -> None:
    registry = await replicas.start()
    await registry.register(TOKEN, ttl=60)
    await registry.register(OTHER_TOKEN, ttl=60)
    await registry.forget([TOKEN, "cccccccccc"])
    await registry.forget([])
    assert not await registry.is_pending(TOKEN)
    assert await registry.message_secret(TOKEN) is None
    assert await registry.is_pending(OTHER_TOKEN)


async def test_tokens_carry_their_ttl_and_expire(replicas: Replicas) -> None:
    registry = await replicas.start()
    await registry.register(TOKEN, ttl=60)
    await registry.register(OTHER_TOKEN, ttl=0.05)
    async with Redis.from_url(replicas.url) as direct:
        assert 59_000 < await direct.pttl(f"{replicas.prefix}canary:{TOKEN}") <= 60_000
    # Polled, not slept: Redis expires the key when it is next read after 50 ms.
    async with asyncio.timeout(WAIT):
        while await registry.is_pending(OTHER_TOKEN):
            await asyncio.sleep(0.01)
    assert not await registry.mark_arrived(OTHER_TOKEN, source=SOURCE)
    assert await registry.is_pending(TOKEN)


async def test_wait_reports_earlier_and_live_arrivals_in_order(replicas: Replicas) -> None:
    registry = await replicas.start()
    tokens = ["early00000", "early22222", "late000000"]
    for token in tokens:
        await registry.register(token, ttl=60)
    await registry.mark_arrived("early22222", source="192.0.2.2")
    await registry.mark_arrived("early00000", source="192.0.2.1")
    arrivals = Arrivals()
    waiting = asyncio.create_task(registry.wait(tokens, timeout=WAIT, on_arrival=arrivals))
    await eventually(lambda: len(arrivals.seen) == 2)
    await registry.mark_arrived("late000000", source="2001:db8::2")
    assert await waiting == set(tokens)
    assert [(token, source) for token, _, source in arrivals.seen] == [
        ("early00000", "192.0.2.1"),
        ("early22222", "192.0.2.2"),
        ("late000000", "2001:db8::2"),
    ]
    assert all(0 <= after_s < WAIT for _, after_s, _ in arrivals.seen)


async def test_wait_returns_the_partial_set_at_its_timeout(replicas: Replicas) -> None:
    registry = await replicas.start()
    for token in (TOKEN, OTHER_TOKEN):
        await registry.register(token, ttl=60)
    await registry.mark_arrived(TOKEN, source=SOURCE)
    started = time.monotonic()
    arrived = await registry.wait(
        [TOKEN, OTHER_TOKEN], timeout=0.2, on_arrival=lambda token, after_s, source: None
    )
    assert 0.2 <= time.monotonic() - started < 0.2 + MARGIN_S
    assert arrived == {TOKEN}


async def test_wait_for_nothing_returns_at_once(replicas: Replicas) -> None:
    registry = await replicas.start()
    assert await registry.wait([], timeout=WAIT, on_arrival=lambda *arrival: None) == set()


# --- two replicas ---------------------------------------------------------------------------------


async def test_an_arrival_at_another_replica_reaches_the_waiter_at_once(
    replicas: Replicas,
) -> None:
    a, b = await replicas.start(), await replicas.start()
    await a.register(TOKEN, ttl=60)
    await a.register(OTHER_TOKEN, ttl=60)
    arrivals = Arrivals()
    waiting = asyncio.create_task(a.wait([TOKEN, OTHER_TOKEN], timeout=WAIT, on_arrival=arrivals))
    # b's sink checks RCPT and the secret, and marks the arrival.
    assert await b.is_pending(TOKEN)
    secret = await b.message_secret(TOKEN)
    assert secret == await a.message_secret(TOKEN)
    await asyncio.sleep(0.05)  # the waiter is listening
    marked_at = time.monotonic()
    assert await b.mark_arrived(TOKEN, source=SOURCE)
    await eventually(lambda: arrivals.seen != [], within=1.0)
    assert arrivals.at[0] - marked_at < 1.0
    [(token, after_s, source)] = arrivals.seen
    assert (token, source) == (TOKEN, SOURCE)
    assert 0.05 <= after_s < WAIT
    assert not waiting.done()
    assert await b.mark_arrived(OTHER_TOKEN, source="2001:db8::25")
    assert await waiting == {TOKEN, OTHER_TOKEN}
    print(f"arrival on another replica heard after {1000 * (arrivals.at[0] - marked_at):.1f} ms")


async def test_a_relayed_message_at_another_replicas_sink_confirms_the_test(
    replicas: Replicas, start_server: StartServer
) -> None:
    """The issue's case: the test runs on replica A, the open relay delivers to B's sink."""
    a, b = await replicas.start(), await replicas.start()
    sink_b = CanarySink(registry=b, domain="relaytest.invalid", hostname="sink-b.test")
    host, port = await sink_b.start("127.0.0.1", 0)
    try:
        relay = FakeMailServer(relay=lambda rcpt: b"%" in rcpt, forward_to=(host, port))
        options = RelayTestOptions(
            port=await start_server(relay), reply_timeout=2.0, confirm_wait=WAIT
        )
        transcript = Transcript()
        await run_relay_test("127.0.0.1", options, transcript.add, registry=a, ptr_lookup=no_ptr)
    finally:
        await sink_b.stop()
    assert sink_b.deliveries == 3
    assert (
        sum(
            bool(
                re.fullmatch(r":Relayed: Test \d+ arrived after \d+\.\d s from 127\.0\.0\.1", line)
            )
            for line in transcript.lines
        )
        == 3
    )
    assert any(
        line.startswith("Relay confirmed: 3 of 3 test messages arrived")
        for line in transcript.lines
    )


async def no_ptr(address: str, *, timeout: float) -> str | None:
    return None


async def test_only_the_first_of_concurrent_arrivals_counts(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    await a.register(TOKEN, ttl=60)
    arrivals = Arrivals()
    waiting = asyncio.create_task(a.wait([TOKEN], timeout=WAIT, on_arrival=arrivals))
    sources = [f"192.0.2.{n}" for n in range(1, 41)]
    marks = await asyncio.gather(
        *(
            (a if n % 2 else b).mark_arrived(TOKEN, source=source)
            for n, source in enumerate(sources)
        )
    )
    assert sum(marks) == 1
    winner = sources[marks.index(True)]
    assert await waiting == {TOKEN}
    assert [(token, source) for token, _, source in arrivals.seen] == [(TOKEN, winner)]


async def test_replicas_do_not_hear_each_others_arrivals(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    await a.register(TOKEN, ttl=60)
    await b.register(OTHER_TOKEN, ttl=60)
    waiting = asyncio.create_task(
        a.wait([TOKEN], timeout=0.3, on_arrival=lambda token, after_s, source: None)
    )
    assert await a.mark_arrived(OTHER_TOKEN, source=SOURCE)
    assert await waiting == set()


# --- Redis down or hung ---------------------------------------------------------------------------


async def test_a_paused_redis_bounds_every_call(
    own_redis: RedisServer, replicas_of_own: Replicas
) -> None:
    registry = await replicas_of_own.start()
    await registry.register(TOKEN, ttl=60)
    own_redis.pause()
    try:
        calls: dict[str, Awaitable[Any]] = {
            "register": registry.register(OTHER_TOKEN, ttl=60),
            "is_pending": registry.is_pending(TOKEN),
            "message_secret": registry.message_secret(TOKEN),
            "mark_arrived": registry.mark_arrived(TOKEN, source=SOURCE),
            "wait": registry.wait([TOKEN], timeout=WAIT, on_arrival=lambda *arrival: None),
            "forget": registry.forget([TOKEN]),
        }
        for operation, call in calls.items():
            took = await bounded(call)
            assert TIMEOUT_S <= took < TIMEOUT_S + MARGIN_S, operation
        # The listener may have found the silence too, at its heartbeat.
        assert [op for op in replicas_of_own.unavailable if op != "listen"] == list(calls)
        assert not registry.healthy
        assert registry.last_error == f"forget: no answer within {TIMEOUT_S:g} s"
    finally:
        own_redis.resume()
    assert await registry.is_pending(TOKEN)
    assert registry.healthy


async def test_a_wait_rides_out_a_restart_of_redis(
    own_redis: RedisServer, replicas_of_own: Replicas
) -> None:
    a, b = await replicas_of_own.start(), await replicas_of_own.start()
    await a.register(TOKEN, ttl=60)
    arrivals = Arrivals()
    waiting = asyncio.create_task(a.wait([TOKEN], timeout=3 * WAIT, on_arrival=arrivals))
    await asyncio.sleep(0.05)
    own_redis.stop()
    await eventually(lambda: not a.healthy)
    assert "listen" in replicas_of_own.unavailable
    with pytest.raises(RegistryUnavailable):
        await b.mark_arrived(TOKEN, source=SOURCE)
    own_redis.start()
    # Nothing is saved: the restarted Redis has lost the token, which the test registers again.
    await eventually(lambda: a.healthy)
    await a.register(TOKEN, ttl=60)
    marked_at = time.monotonic()
    assert await b.mark_arrived(TOKEN, source=SOURCE)
    assert await waiting == {TOKEN}
    assert arrivals.at[0] - marked_at < 1.0
    assert not waiting.cancelled()


async def test_a_wait_ends_when_redis_stays_down(
    own_redis: RedisServer, replicas_of_own: Replicas
) -> None:
    registry = await replicas_of_own.start()
    await registry.register(TOKEN, ttl=60)
    waiting = asyncio.create_task(
        registry.wait([TOKEN], timeout=1.0, on_arrival=lambda *arrival: None)
    )
    await asyncio.sleep(0.05)
    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable):
        await waiting
    assert time.monotonic() - started < 1.0 + MARGIN_S
    # A wait that starts with Redis down does not wait at all.
    assert await bounded(registry.wait([TOKEN], timeout=WAIT, on_arrival=print)) < MARGIN_S


async def test_a_registry_started_without_redis_heals_when_it_comes(
    own_redis: RedisServer, replicas_of_own: Replicas
) -> None:
    own_redis.stop()
    started = time.monotonic()
    registry = await replicas_of_own.start()
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert not registry.healthy
    assert registry.last_error is not None
    assert await bounded(registry.register(TOKEN, ttl=60)) < MARGIN_S
    own_redis.start()
    await eventually(lambda: registry.healthy, within=WAIT + RETRY_S)
    await registry.register(TOKEN, ttl=60)
    assert await registry.is_pending(TOKEN)


async def test_the_sink_answers_451_while_redis_is_down(
    own_redis: RedisServer, replicas_of_own: Replicas
) -> None:
    registry = await replicas_of_own.start()
    await registry.register(TOKEN, ttl=60)
    message = await proof_message(registry, TOKEN)
    sink = CanarySink(registry=registry, domain=DOMAIN, hostname="sink.test")
    _, port = await sink.start("127.0.0.1", 0)
    try:
        client, _ = await Client.connect(port)
        assert await client.command("EHLO relay.test") == 250
        assert await client.command("MAIL FROM:<>") == 250
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
        assert await client.command("DATA") == 354
        own_redis.pause()
        try:
            client.writer.write(message + b".\r\n")
            assert await client.reply() == 451
            assert await client.command("MAIL FROM:<>") == 250
            assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 451
        finally:
            own_redis.resume()
        # The relay tries again, and the message counts.
        assert await client.command(f"RCPT TO:<{address(TOKEN)}>") == 250
        assert await client.command("DATA") == 354
        client.writer.write(message + b".\r\n")
        assert await client.reply() == 250
        assert not await registry.is_pending(TOKEN)
        assert sink.deliveries == 1
        await client.close()
    finally:
        await sink.stop()


@pytest.mark.parametrize("fault", ["stopped", "paused"])
async def test_a_test_with_the_registry_unreachable_runs_without_confirmation(
    own_redis: RedisServer, replicas_of_own: Replicas, start_server: StartServer, fault: str
) -> None:
    registry = await replicas_of_own.start()
    if fault == "stopped":
        own_redis.stop()
    else:
        own_redis.pause()
    try:
        port = await start_server(FakeMailServer(relay=relays_everything))
        transcript = Transcript()
        started = time.monotonic()
        summary = await run_relay_test(
            "127.0.0.1",
            RelayTestOptions(port=port, reply_timeout=2.0, confirm_wait=30.0),
            transcript.add,
            registry=registry,
            ptr_lookup=no_ptr,
        )
        took = time.monotonic() - started
    finally:
        if fault == "paused":
            own_redis.resume()
    assert took < 5.0  # not the confirm wait: one failed registration and one forget
    assert summary.verdict == "accepted"
    assert not any(line.startswith(":Waiting up to") for line in transcript.lines)
    assert "Note: delivery confirmation unavailable: registry unreachable" in transcript.lines
    # Every probe ran, without a token.
    assert len(summary.probes) == 20
    assert ">>> RCPT TO:<nobody@relaytest.invalid>" in transcript.lines
