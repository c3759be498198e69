"""The shared rate limiter against a real redis-server; two limiters on one Redis: two replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Connection, ConnectionPool, Redis
from structlog.testing import capture_logs

from relayprobe.frontdoors.access import RateDecision, RateLimiter
from relayprobe.frontdoors.sharedlimits import SharedRateLimiter
from relayprobe.storage import redisclient
from tests.frontdoors.test_access import ALLOWED, UNLIMITED, FakeClock, ip
from tests.infra.dataservers import RedisServer

TIMEOUT_S = 0.2
# What a loaded machine may add to a bounded call: generous, since only an unbounded wait fails.
MARGIN_S = 0.5

Replica = Callable[..., SharedRateLimiter]


def connect(url: str) -> Redis:
    """A client as a replica makes one."""
    return redisclient.connect(url, timeout_s=TIMEOUT_S, max_connections=20)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client for looking at what the limiters wrote; the database starts empty."""
    client = connect(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def replica(redis_server: RedisServer, redis: Redis) -> AsyncIterator[Replica]:
    """Makes a limiter with a Redis client of its own, all limits off unless turned on."""
    clients: list[Redis] = []

    def make(**options: Any) -> SharedRateLimiter:
        client = connect(redis_server.url)
        clients.append(client)
        return SharedRateLimiter(client, **(UNLIMITED | {"timeout_s": TIMEOUT_S} | options))

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def restarted(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The server, for a test that stops or pauses it: running again afterwards."""
    yield redis_server
    if redis_server.process is None:
        redis_server.start()
    else:
        redis_server.resume()


async def timed(call: Any) -> tuple[RateDecision, float]:
    started = time.monotonic()
    decision = await call
    return decision, time.monotonic() - started


# The limits, as access.RateLimiter keeps them, now across two replicas


async def test_per_address_interval_across_replicas(replica: Replica) -> None:
    clock = FakeClock()
    a = replica(clock=clock, per_address_interval=60.0)
    b = replica(clock=clock, per_address_interval=60.0)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert await b.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)
    assert await b.check(ip("198.51.100.1")) == ALLOWED
    clock.advance(59.5)
    assert await a.check(ip("192.0.2.1")) == RateDecision(False, "address", 0.5)
    clock.advance(0.5)
    assert await b.check(ip("192.0.2.1")) == ALLOWED
    assert await a.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)


async def test_redis_time_is_the_clock_of_every_replica(replica: Replica) -> None:
    a, b = replica(per_address_interval=60.0), replica(per_address_interval=60.0)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    decision = await b.check(ip("192.0.2.1"))
    assert decision.reason == "address"
    assert 59 < decision.retry_after <= 60


async def test_per_prefix_sliding_window(replica: Replica) -> None:
    clock = FakeClock()
    options = {"per_address_interval": 1000.0, "per_prefix": 3, "prefix_window": 60.0}
    a, b = replica(clock=clock, **options), replica(clock=clock, **options)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    clock.advance(10)
    assert await b.check(ip("192.0.2.2")) == ALLOWED
    clock.advance(10)
    assert await a.check(ip("192.0.2.3")) == ALLOWED
    assert await b.check(ip("192.0.2.4")) == RateDecision(False, "prefix", 40.0)
    assert await b.check(ip("192.0.3.1")) == ALLOWED
    clock.advance(40)
    assert await b.check(ip("192.0.2.4")) == ALLOWED
    assert await a.check(ip("192.0.2.5")) == RateDecision(False, "prefix", 10.0)


async def test_ipv6_prefix_keys(replica: Replica, redis: Redis) -> None:
    a, b = replica(per_prefix=1), replica(per_prefix=1)
    assert await a.check(ip("2001:db8:0:1::1")) == ALLOWED
    assert (await b.check(ip("2001:db8:0:ff::1"))).reason == "prefix"
    assert await b.check(ip("2001:db8:0:100::1")) == ALLOWED
    assert sorted(await redis.keys("relayprobe:rate:prefix:*")) == [
        b"relayprobe:rate:prefix:2001:db8:0:100::/56",
        b"relayprobe:rate:prefix:2001:db8::/56",
    ]


async def test_prefix_lengths_and_key_prefix_are_configurable(
    replica: Replica, redis: Redis
) -> None:
    options = {"per_prefix": 1, "ipv4_prefix": 16, "ipv6_prefix": 64, "key_prefix": "rp-test:"}
    a, b = replica(**options), replica(**options)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert (await b.check(ip("192.0.200.1"))).reason == "prefix"
    assert await b.check(ip("192.1.2.1")) == ALLOWED
    assert await a.check(ip("2001:db8:0:1::1")) == ALLOWED
    assert await b.check(ip("2001:db8:0:2::1")) == ALLOWED
    assert b"rp-test:prefix:192.0.0.0/16" in await redis.keys("*")
    assert await redis.keys("relayprobe:*") == []


async def test_ipv4_mapped_counts_as_ipv4(replica: Replica, redis: Redis) -> None:
    a, b = replica(per_address_interval=60.0, per_prefix=2), replica(per_prefix=2)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert (await a.check(ip("::ffff:192.0.2.1"))).reason == "address"
    assert await b.check(ip("::ffff:192.0.2.2")) == ALLOWED
    assert (await a.check(ip("192.0.2.3"))).reason == "prefix"
    assert b"relayprobe:rate:prefix:192.0.2.0/24" in await redis.keys("*")


async def test_global_token_bucket_and_refill(replica: Replica) -> None:
    clock = FakeClock()
    # Slow enough that the bucket's key outlives the test in real time (it expires when full).
    a = replica(clock=clock, global_per_second=0.04, global_burst=2)
    b = replica(clock=clock, global_per_second=0.04, global_burst=2)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert await b.check(ip("198.51.100.1")) == ALLOWED
    assert await a.check(ip("203.0.113.1")) == RateDecision(False, "global", 25.0)
    clock.advance(12.5)
    assert await b.check(ip("203.0.113.1")) == RateDecision(False, "global", 12.5)
    clock.advance(12.5)
    assert await b.check(ip("203.0.113.1")) == ALLOWED
    assert await a.check(ip("203.0.113.2")) == RateDecision(False, "global", 25.0)
    clock.advance(3600)  # refills only up to the burst
    assert await a.check(ip("203.0.113.2")) == ALLOWED
    assert await b.check(ip("203.0.113.3")) == ALLOWED
    assert (await a.check(ip("203.0.113.4"))).reason == "global"


async def test_a_refunded_global_token_is_shared_but_not_beyond_the_burst(
    replica: Replica,
) -> None:
    clock = FakeClock()
    options = {"global_per_second": 0.001, "global_burst": 1, "per_address_interval": 60.0}
    a, b = replica(clock=clock, **options), replica(clock=clock, **options)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert (await b.check(ip("198.51.100.1"))).reason == "global"
    await a.refund_global()
    assert await b.check(ip("198.51.100.1")) == ALLOWED
    await b.refund_global()
    await a.refund_global()  # a second refund does not lift the burst
    assert await a.check(ip("203.0.113.1")) == ALLOWED
    assert (await b.check(ip("203.0.113.2"))).reason == "global"
    await b.refund_global()
    assert (await b.check(ip("192.0.2.1"))).reason == "address"  # still charged


async def test_the_longest_wait_is_reported(replica: Replica) -> None:
    clock = FakeClock()
    options = {
        "per_address_interval": 60.0,
        "per_prefix": 1,
        "prefix_window": 30.0,
        "global_per_second": 1.0,
        "global_burst": 1,
    }
    a, b = replica(clock=clock, **options), replica(clock=clock, **options)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert await b.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)
    assert await b.check(ip("192.0.2.2")) == RateDecision(False, "prefix", 30.0)
    assert await b.check(ip("198.51.100.1")) == RateDecision(False, "global", 1.0)
    clock.advance(40)
    assert await b.check(ip("192.0.2.1")) == RateDecision(False, "address", 20.0)
    assert await a.peek(ip("192.0.2.1")) == RateDecision(False, "address", 20.0)


async def test_a_longer_prefix_wait_beats_the_address_wait(replica: Replica) -> None:
    clock = FakeClock()
    options = {"per_address_interval": 10.0, "per_prefix": 1, "prefix_window": 60.0}
    a, b = replica(clock=clock, **options), replica(clock=clock, **options)
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    assert await b.check(ip("192.0.2.1")) == RateDecision(False, "prefix", 60.0)


async def test_refusals_and_peeks_consume_nothing(replica: Replica) -> None:
    clock = FakeClock()
    options = {
        "per_address_interval": 1000.0,
        "per_prefix": 1,
        "prefix_window": 10.0,
        # Slow: the bucket's key expires, in real time, when the bucket would be full again.
        "global_per_second": 0.2,
        "global_burst": 2,
    }
    a, b = replica(clock=clock, **options), replica(clock=clock, **options)
    assert await a.peek(ip("192.0.2.1")) == ALLOWED
    assert await a.check(ip("192.0.2.1")) == ALLOWED
    for _ in range(20):
        assert (await b.check(ip("192.0.2.1"))).reason == "address"
        assert (await a.check(ip("192.0.2.2"))).reason == "prefix"
        assert await b.peek(ip("198.51.100.1")) == ALLOWED
    # Neither the refusals nor the peeks were counted.
    assert await b.check(ip("198.51.100.1")) == ALLOWED
    assert (await a.check(ip("203.0.113.1"))).reason == "global"
    clock.advance(10)
    assert await a.check(ip("192.0.2.2")) == ALLOWED
    assert await b.check(ip("203.0.113.1")) == ALLOWED


# Atomicity and round trips


async def test_concurrent_checks_never_exceed_the_global_burst(replica: Replica) -> None:
    burst = 37
    # Redis's clock; the bucket refills by a millionth of a token in a second.
    replicas = [replica(global_per_second=1e-6, global_burst=burst) for _ in range(2)]
    addresses = [IPv4Address((10 << 24) + (number << 8) + 1) for number in range(200)]
    decisions = await asyncio.gather(
        *(replicas[number % 2].check(address) for number, address in enumerate(addresses))
    )
    assert sum(decision.allowed for decision in decisions) == burst
    assert {decision.reason for decision in decisions if not decision.allowed} == {"global"}
    assert not any(limits.degraded for limits in replicas)


async def test_concurrent_checks_from_one_address_allow_one(replica: Replica) -> None:
    replicas = [replica(per_address_interval=60.0) for _ in range(2)]
    decisions = await asyncio.gather(
        *(replicas[number % 2].check(ip("2001:db8::7")) for number in range(200))
    )
    assert [decision.allowed for decision in decisions].count(True) == 1
    assert not any(limits.degraded for limits in replicas)


async def test_one_round_trip_per_admission(redis_server: RedisServer, redis: Redis) -> None:
    sent: list[int] = []

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            await super().send_packed_command(command, check_health)

    pool = ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = Redis(connection_pool=pool)
    limits = SharedRateLimiter(client, **UNLIMITED)
    try:
        await limits.check(ip("192.0.2.1"))  # connects and loads the script
        before = await redis.info("commandstats")
        sent.clear()
        for host in range(2, 52):
            assert await limits.check(ip(f"192.0.2.{host}")) == ALLOWED
        assert len(sent) == 50
        await limits.peek(ip("192.0.2.1"))
        await limits.refund_global()
        assert len(sent) == 52
        after = await redis.info("commandstats")
        assert after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"] == 52
    finally:
        await client.aclose()


async def test_a_flushed_script_cache_is_filled_again(replica: Replica, redis: Redis) -> None:
    limits = replica(per_address_interval=60.0)
    assert await limits.check(ip("192.0.2.1")) == ALLOWED
    await redis.script_flush()
    assert (await limits.check(ip("192.0.2.1"))).reason == "address"
    assert not limits.degraded


# Keys expire


async def test_keys_expire_when_they_no_longer_limit(replica: Replica, redis: Redis) -> None:
    limits = replica(
        per_address_interval=60.0,
        per_prefix=5,
        prefix_window=30.0,
        global_per_second=2.0,
        global_burst=3,
    )
    assert await limits.check(ip("2001:db8::1")) == ALLOWED
    ttls = {key.decode(): await redis.pttl(key) for key in await redis.keys("*")}
    assert set(ttls) == {
        "relayprobe:rate:address:2001:db8::1/128",
        "relayprobe:rate:prefix:2001:db8::/56",
        "relayprobe:rate:global",
    }
    assert 59_000 < ttls["relayprobe:rate:address:2001:db8::1/128"] <= 60_000
    assert 29_000 < ttls["relayprobe:rate:prefix:2001:db8::/56"] <= 30_000
    # The bucket is full again half a second after one token was taken.
    assert 0 < ttls["relayprobe:rate:global"] <= 500
    await limits.refund_global()
    assert not await redis.exists("relayprobe:rate:global")


async def test_expired_keys_are_gone(replica: Replica, redis: Redis) -> None:
    limits = replica(per_address_interval=0.05, prefix_window=0.05, global_per_second=20.0)
    assert await limits.check(ip("192.0.2.1")) == ALLOWED
    assert await redis.dbsize() == 3
    deadline = time.monotonic() + 5
    while await redis.dbsize() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await redis.keys("*") == []


# Redis down, slow or refusing


async def test_stopped_redis_falls_back_to_local_limits_and_back(
    replica: Replica, restarted: RedisServer, redis: Redis
) -> None:
    fallbacks: list[None] = []
    limits = replica(
        per_address_interval=60.0,
        global_per_second=0.1,  # a global wait (10 s) shorter than the address wait
        global_burst=1,
        probe_interval_s=0.0,
        on_fallback=lambda: fallbacks.append(None),
    )
    assert await limits.check(ip("192.0.2.1")) == ALLOWED  # charged in Redis only
    restarted.stop()
    with capture_logs() as logged:
        decision, elapsed = await timed(limits.check(ip("192.0.2.1")))
        assert decision == ALLOWED  # the local limiter has not seen it
        assert elapsed < TIMEOUT_S + MARGIN_S
        assert limits.degraded
        assert limits.last_error is not None
        assert (await limits.check(ip("192.0.2.1"))).reason == "address"
        assert (await limits.check(ip("198.51.100.1"))).reason == "global"
        await limits.refund_global()
        assert await limits.peek(ip("198.51.100.1")) == ALLOWED
        assert len(fallbacks) == 4
        restarted.start()
        assert await limits.check(ip("192.0.2.1")) == ALLOWED  # a new, empty Redis
        assert (await limits.check(ip("192.0.2.1"))).reason == "address"
    assert not limits.degraded
    assert limits.last_error is None
    assert len(fallbacks) == 4
    assert await redis.exists("relayprobe:rate:address:192.0.2.1/32")
    events = [entry["event"] for entry in logged]
    assert events == ["rate_limit_fallback", "rate_limit_shared_again"]
    assert logged[1]["after"] == fallback_reason(logged)


def fallback_reason(logged: list[Any]) -> str:
    """The reason the one `rate_limit_fallback` line gives: one printable line."""
    [reason] = [entry["reason"] for entry in logged if entry["event"] == "rate_limit_fallback"]
    assert isinstance(reason, str)
    assert reason
    assert reason.isprintable()
    return reason


async def test_while_degraded_redis_is_tried_again_only_after_the_probe_interval(
    replica: Replica, restarted: RedisServer, redis: Redis
) -> None:
    clock = FakeClock()
    limits = replica(clock=clock, per_address_interval=60.0, probe_interval_s=10.0)
    restarted.stop()
    assert await limits.check(ip("192.0.2.1")) == ALLOWED
    restarted.start()
    clock.advance(9.5)
    assert await limits.check(ip("192.0.2.2")) == ALLOWED
    assert limits.degraded
    assert await redis.dbsize() == 0  # not asked
    clock.advance(0.5)
    assert await limits.check(ip("192.0.2.3")) == ALLOWED
    assert not limits.degraded
    assert await redis.exists("relayprobe:rate:address:192.0.2.3/32")


async def test_paused_redis_costs_each_check_at_most_the_timeout(
    replica: Replica, restarted: RedisServer
) -> None:
    fallbacks: list[None] = []
    limits = replica(
        per_address_interval=60.0,
        probe_interval_s=0.0,
        on_fallback=lambda: fallbacks.append(None),
    )
    assert await limits.check(ip("192.0.2.1")) == ALLOWED  # connected
    restarted.pause()
    with capture_logs() as logged:
        for host in range(2, 6):
            decision, elapsed = await timed(limits.check(ip(f"192.0.2.{host}")))
            assert decision == ALLOWED
            assert elapsed < TIMEOUT_S + MARGIN_S
        assert (await limits.check(ip("192.0.2.5"))).reason == "address"
    assert len(fallbacks) == 5
    assert limits.last_error == f"no answer within {TIMEOUT_S:g} s"
    assert [entry["event"] for entry in logged] == ["rate_limit_fallback"]
    restarted.resume()
    assert await limits.check(ip("192.0.2.9")) == ALLOWED
    assert not limits.degraded


async def test_while_degraded_one_caller_tries_redis_and_the_others_do_not_wait(
    replica: Replica, restarted: RedisServer
) -> None:
    clock = FakeClock()
    limits = replica(clock=clock, probe_interval_s=5.0)
    assert await limits.check(ip("192.0.2.1")) == ALLOWED  # connected
    restarted.pause()
    assert await limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.degraded
    clock.advance(5)
    timings = await asyncio.gather(
        *(timed(limits.check(ip(f"198.51.100.{host}"))) for host in range(1, 51))
    )
    assert all(decision == ALLOWED for decision, _ in timings)
    assert [elapsed >= TIMEOUT_S for _, elapsed in timings].count(True) == 1


async def test_a_redis_that_refuses_writes_is_an_outage_too(replica: Replica, redis: Redis) -> None:
    limits = replica(per_address_interval=60.0, probe_interval_s=0.0)
    await redis.config_set("maxmemory", 1)
    try:
        with capture_logs() as logged:
            assert await limits.check(ip("192.0.2.1")) == ALLOWED
            assert limits.degraded
            assert (await limits.check(ip("192.0.2.1"))).reason == "address"  # decided here
            # A peek writes nothing, so Redis answers it: it never saw the start.
            assert await limits.peek(ip("192.0.2.1")) == ALLOWED
            assert not limits.degraded
    finally:
        await redis.config_set("maxmemory", 0)
    assert "maxmemory" in fallback_reason(logged)
    assert logged[0]["exc_info"] is not None  # Redis answered: worth a traceback
    assert await redis.dbsize() == 0


async def test_a_restarted_redis_is_used_at_once(replica: Replica, restarted: RedisServer) -> None:
    limits = replica(per_address_interval=60.0)
    assert await limits.check(ip("192.0.2.1")) == ALLOWED
    restarted.stop()
    restarted.start()  # the pooled connection is closed, and the script cache empty
    with capture_logs() as logged:
        assert await limits.check(ip("192.0.2.1")) == ALLOWED
        assert (await limits.check(ip("192.0.2.1"))).reason == "address"
    assert logged == []
    assert not limits.degraded


def test_bad_options_are_rejected() -> None:
    client = Redis()  # never connected
    for options in ({"timeout_s": 0.0}, {"probe_interval_s": -1.0}, {"per_prefix": 0}):
        with pytest.raises(ValueError, match=next(iter(options))):
            SharedRateLimiter(client, **options)


# The same decisions as the in-memory limiter


POOL = ["192.0.2.1", "::ffff:192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8:0:1::1"]
steps = st.lists(
    st.tuples(
        st.sampled_from(["check", "check", "peek", "refund"]),
        st.sampled_from(POOL),
        st.booleans(),
        # Multiples of 1/64 s: exact as floats and as microseconds, so both must agree exactly.
        st.integers(min_value=0, max_value=64 * 50).map(lambda n: n / 64),
    ),
    max_size=40,
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=steps)
def test_two_replicas_decide_as_one_in_memory_limiter(
    redis_server: RedisServer, sequence: list[tuple[str, str, bool, float]]
) -> None:
    options: dict[str, Any] = {
        "per_address_interval": 30.0,
        "per_prefix": 3,
        "prefix_window": 45.0,
        "global_per_second": 0.5,
        "global_burst": 3,
    }

    async def run() -> None:
        clock = FakeClock()
        expected = RateLimiter(clock=clock, **options)
        clients = [connect(redis_server.url) for _ in range(2)]
        try:
            await clients[0].flushall()
            replicas = [SharedRateLimiter(client, clock=clock, **options) for client in clients]
            for action, text, on_b, advance in sequence:
                clock.advance(advance)
                shared = replicas[int(on_b)]
                if action == "refund":
                    await shared.refund_global()
                    expected.refund_global()
                elif action == "peek":
                    assert await shared.peek(ip(text)) == expected.peek(ip(text))
                else:
                    assert await shared.check(ip(text)) == expected.check(ip(text))
            assert not any(limits.degraded for limits in replicas)
        finally:
            for client in clients:
                await client.aclose()

    asyncio.run(run())
