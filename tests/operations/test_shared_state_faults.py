"""The whole service while its shared state fails: Redis stopped mid-test, slow, or away from the
start; PostgreSQL stopped; two replicas on one Redis. Real servers on loopback (tests/infra/
dataservers.py); each caller and its fake mail server share a 127.0.0.N address, as in
test_operations. What callers and operators see is docs/operator-guide.md section 8's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from redis import Redis
from redis.asyncio import Redis as RedisAsync
from structlog.testing import capture_logs

from relayprobe.app import Application
from relayprobe.fakemx import FakeMailServer, relays_everything
from relayprobe.operations.config import Endpoint
from relayprobe.operations.metrics import REGISTRY_OPERATIONS
from relayprobe.storage.pgstore import PostgresHistory
from tests.confirmation.test_redisregistry import eventually
from tests.frontdoors.test_web import request
from tests.infra.dataservers import PostgresServer, RedisServer
from tests.infra.haproxy import free_port
from tests.operations.test_operations import (
    LOOSE_LIMITS,
    VERDICT_LINE,
    call,
    exposition,
    http_get,
    metric,
    running_app,
    serving_mail,
)

REDIS_TIMEOUT_S = 0.2
# What a loaded machine may add to a bounded call: generous, since only an unbounded wait fails.
MARGIN_S = 0.5
# Long enough that waiting it is plain from the clock, short enough for a confirmed test to end.
CONFIRM_WAIT_S = 3.0
# Within this, a service notices that a shared server is back (the registry retries every 0.5 s,
# the history writer every 1 s).
RECOVERY_S = 5.0
UNAVAILABLE_NOTE = "Note: delivery confirmation unavailable: registry unreachable"
# Every test message arrived: the open relays deliver each at once.
CONFIRMED = re.compile(r"Relay confirmed: (\d+) of \1 test messages arrived ")
ACCEPTED = re.compile(r"System appeared to accept \d+ relay attempts")
FULL_RESULT = re.compile(r"Full result: \S+/results/([A-Za-z0-9_-]+)")
PUBLIC_URL = "http://relay-test.example"


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The module's Redis, emptied: no token or rate limit of an earlier test."""
    with Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@dataclass
class Service:
    """An Application with its canary sink and operators' endpoint."""

    app: Application

    async def readyz(self) -> str:
        assert self.app.http_address is not None
        status, body = await http_get(self.app.http_address, "/readyz")
        assert status == 200, body
        return body

    def metrics(self) -> str:
        return exposition(self.app)


@contextlib.asynccontextmanager
async def confirming_service(
    callers: list[str], *, reply_delay: float = 0.0, **changes: object
) -> AsyncIterator[Service]:
    """The service with delivery confirmation, and an open relay on each caller's address that
    really delivers its test messages to the service's sink."""
    relays = {
        caller: FakeMailServer(relay=relays_everything, reply_delay=reply_delay)
        for caller in callers
    }
    async with (
        serving_mail(relays) as port,
        running_app(
            target_port=port,
            sink_listen=Endpoint("127.0.0.1", 0),
            http_listen=Endpoint("127.0.0.1", 0),
            confirm_wait=CONFIRM_WAIT_S,
            redis_timeout=REDIS_TIMEOUT_S,
            **changes,
        ) as app,
    ):
        assert app.sink_address is not None
        for relay in relays.values():
            relay.forward_to = (app.sink_address.host, app.sink_address.port)
        yield Service(app)


def registry_failures(exposition_text: str) -> float:
    return sum(
        metric(exposition_text, "relayprobe_registry_failures_total", operation=operation)
        for operation in REGISTRY_OPERATIONS
    )


# Redis


@contextlib.contextmanager
def started_again(server: RedisServer) -> Iterator[None]:
    """Whatever the test does to the module's Redis, it answers again afterwards."""
    try:
        yield
    finally:
        if server.process is None:
            server.start()
        else:
            server.resume()


async def test_redis_stopped_mid_test_ends_it_unconfirmed_at_once_and_recovers(
    redis_server: RedisServer, redis_url: str
) -> None:
    first, second = "127.0.70.1", "127.0.70.2"
    # Slow enough that the outage starts with most probes still to run.
    async with confirming_service([first, second], reply_delay=0.005, redis_url=redis_url) as up:
        endpoint = up.app.listening[0]
        assert await up.readyz() == "ready"
        with started_again(redis_server):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(first, 0)), 10
            )
            try:
                head = await asyncio.wait_for(reader.readuntil(b":Relay test: #Test 2\r\n"), 10)
                # Blocking on purpose: the service stands still meanwhile, so that the outage
                # begins exactly here, between two probes.
                redis_server.stop()
                stopped = time.monotonic()
                rest = await asyncio.wait_for(reader.read(), 10)
                unconfirmed_s = time.monotonic() - stopped
            finally:
                writer.close()
            lines = (head + rest).decode().split("\r\n")
            assert any(ACCEPTED.fullmatch(line) for line in lines), lines
            assert UNAVAILABLE_NOTE in lines
            assert not any(line.startswith(":Waiting up to") for line in lines), lines
            assert unconfirmed_s < CONFIRM_WAIT_S
            degraded = await up.readyz()
            assert degraded.startswith("degraded: token registry: "), degraded
            assert registry_failures(up.metrics()) > 0

        # redis-py reconnects by itself; the registry's listener subscribes again.
        await eventually(lambda: up.app.ready().degraded == (), within=RECOVERY_S)
        assert await up.readyz() == "ready"
        lines = await call(endpoint, source=second)
        assert any(CONFIRMED.match(line) for line in lines), lines
        assert UNAVAILABLE_NOTE not in lines


@contextlib.asynccontextmanager
async def asleep(server: RedisServer, seconds: int) -> AsyncIterator[None]:
    """Redis stuck in one slow command (DEBUG SLEEP) for `seconds`, from the block's start; the
    block's end waits for it to answer again."""
    async with RedisAsync.from_url(server.url) as sleeper, RedisAsync.from_url(server.url) as peer:
        sleeping = asyncio.create_task(
            sleeper.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
        )
        try:
            # Asleep once a PING goes unanswered: the sleep runs before any later command.
            deadline = time.monotonic() + seconds
            while True:
                try:
                    async with asyncio.timeout(0.05):
                        await peer.ping()
                except TimeoutError:
                    break
                assert time.monotonic() < deadline, "Redis answers still: DEBUG SLEEP failed"
                await asyncio.sleep(0.01)
            yield
        finally:
            await asyncio.wait_for(sleeping, seconds + 10)


async def test_redis_slow_admits_at_once_on_local_limits_and_says_degraded(
    redis_server: RedisServer, redis_url: str
) -> None:
    callers = [f"127.0.71.{host}" for host in range(1, 4)]
    async with confirming_service(callers, redis_url=redis_url, **LOOSE_LIMITS) as up:
        endpoint = up.app.listening[0]

        async def first_line_after(caller: str) -> tuple[float, list[str]]:
            started = time.monotonic()
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port, local_addr=(caller, 0)),
                10,
            )
            try:
                first = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
                waited = time.monotonic() - started
                rest = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            return waited, (first + rest).decode().split("\r\n")

        with capture_logs() as logged:
            async with asleep(redis_server, 2):
                answered = await asyncio.gather(*map(first_line_after, callers))
                degraded = await up.readyz()
        for (waited, lines), caller in zip(answered, callers, strict=True):
            assert lines[0] == f"Connecting to {caller} ...", lines
            assert waited < REDIS_TIMEOUT_S + MARGIN_S, (caller, waited)
            assert any(ACCEPTED.fullmatch(line) for line in lines), lines
            assert UNAVAILABLE_NOTE in lines
        assert degraded.startswith("degraded: "), degraded
        assert "token registry: " in degraded
        assert "; rate limits per replica: " in degraded
        assert metric(up.metrics(), "relayprobe_rate_limit_fallbacks_total") >= len(callers)
        assert "rate_limit_fallback" in [entry["event"] for entry in logged]


async def test_redis_away_from_the_start_the_service_starts_and_tests() -> None:
    caller = "127.0.72.1"
    nowhere = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"
    starting = time.monotonic()
    async with confirming_service([caller], redis_url=nowhere, **LOOSE_LIMITS) as up:
        started_s = time.monotonic() - starting
        lines = await call(up.app.listening[0], source=caller)
        degraded = await up.readyz()
        metrics = up.metrics()
    assert started_s < REDIS_TIMEOUT_S + MARGIN_S
    assert any(ACCEPTED.fullmatch(line) for line in lines), lines
    assert UNAVAILABLE_NOTE in lines
    assert degraded.startswith("degraded: token registry: "), degraded
    assert "; rate limits per replica: " in degraded
    assert metric(metrics, "relayprobe_rate_limit_fallbacks_total") == 1
    assert registry_failures(metrics) > 0


async def test_rate_limits_are_shared_by_replicas_and_local_while_redis_hangs(
    redis_server: RedisServer, redis_url: str
) -> None:
    caller = "127.0.73.1"
    replica = functools.partial(
        running_app, redis_url=redis_url, redis_timeout=REDIS_TIMEOUT_S, **LOOSE_LIMITS
    )
    async with (
        serving_mail({caller: FakeMailServer()}) as port,
        replica(target_port=port) as a,
        replica(target_port=port) as b,
    ):
        assert VERDICT_LINE in await call(a.listening[0], source=caller)
        refused = await call(b.listening[0], source=caller)
        assert refused[0].startswith("Too many tests from your address"), refused

        with started_again(redis_server):
            redis_server.pause()
            # B's own limiter has not seen the caller: one test, then B's own limit.
            assert VERDICT_LINE in await call(b.listening[0], source=caller)
            refused = await call(b.listening[0], source=caller)
            assert refused[0].startswith("Too many tests from your address"), refused
            (degraded,) = b.ready().degraded
            assert degraded.startswith("rate limits per replica: "), degraded
        assert metric(exposition(b), "relayprobe_rate_limit_fallbacks_total") == 2


# PostgreSQL


def is_stored(url: str, result_id: str) -> bool:
    with PostgresHistory(url) as history:
        found = history.by_public_id(
            result_id, now=datetime.datetime.now(datetime.UTC), retention_days=1
        )
    return found is not None


async def test_postgres_stopped_tests_go_on_and_results_are_saved_when_it_is_back(
    own_postgres: PostgresServer,
) -> None:
    before, during = "127.0.74.1", "127.0.74.2"
    async with (
        serving_mail({before: FakeMailServer(), during: FakeMailServer()}) as port,
        running_app(
            target_port=port,
            history=True,
            database_url=own_postgres.url,
            web_listen=(Endpoint("127.0.0.1", 0),),
            public_url=PUBLIC_URL,
            http_listen=Endpoint("127.0.0.1", 0),
        ) as app,
    ):
        history, http = app.history, app.http_address
        assert history is not None and http is not None
        (web,) = app.web_addresses

        async def tested(caller: str) -> str:
            """Test `caller`; the ID of its result."""
            lines = await call(app.listening[0], source=caller)
            assert VERDICT_LINE in lines
            (result_id,) = (match[1] for line in lines if (match := FULL_RESULT.fullmatch(line)))
            return result_id

        async def result_status(result_id: str) -> tuple[int, dict[str, str]]:
            status, headers, _ = await request(web, f"GET /results/{result_id} HTTP/1.1\nHost: x")
            return status, headers

        stored = await tested(before)
        await eventually(lambda: history.unsaved(stored) is None)
        assert await asyncio.to_thread(is_stored, own_postgres.url, stored)

        try:
            await asyncio.to_thread(own_postgres.stop)
            made_meanwhile = await tested(during)
            await eventually(lambda: history.last_error is not None)
            status, degraded = await http_get(http, "/readyz")
            assert status == 200 and degraded.startswith("degraded: history: "), degraded
            status, headers = await result_status(stored)
            assert (status, headers["retry-after"]) == (503, "60")
            # Not saved yet, and its link works already: from the writer's queue.
            assert (await result_status(made_meanwhile))[0] == 200
        finally:
            if own_postgres.process is None:
                await asyncio.to_thread(own_postgres.start)

        await eventually(lambda: history.unsaved(made_meanwhile) is None, within=RECOVERY_S)
        assert await asyncio.to_thread(is_stored, own_postgres.url, made_meanwhile)
        assert await http_get(http, "/readyz") == (200, "ready")
        assert (await result_status(stored))[0] == 200
        assert metric(exposition(app), "relayprobe_history_dropped_total") == 0
