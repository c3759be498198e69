from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayprobe.frontdoors.httpserver import Request
from relayprobe.operations.metrics import Metrics
from relayprobe.operations.opshttp import OperatorHTTP, Readiness
from tests.frontdoors.test_httpserver import (
    close_all,
    exchange_bytes,
    open_slow,
    read_to_end,
    request,
)


class SwitchedReadiness:
    def __init__(self) -> None:
        self.ready = False
        self.degraded: tuple[str, ...] = ()

    def __call__(self) -> Readiness:
        return Readiness(self.ready, self.degraded)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> SwitchedReadiness:
    return SwitchedReadiness()


# Routing


def get(path: str, method: str = "GET") -> Request:
    return Request(method, path, (("host", "x"),), ipaddress.IPv4Address("127.0.0.1"))


def test_routes(metrics: Metrics, readiness: SwitchedReadiness) -> None:
    endpoint = OperatorHTTP(metrics=metrics, ready=readiness)
    answers = {
        path: (response.status, response.body)
        for path in ("/healthz", "/readyz", "/", "/nowhere", "/healthz/")
        for response in [endpoint.respond(get(path))]
    }
    assert answers == {
        "/healthz": (200, b"ok"),
        "/readyz": (503, b"not ready"),
        "/": (404, b"not found"),
        "/nowhere": (404, b"not found"),
        "/healthz/": (404, b"not found"),
    }


def test_readyz_follows_the_callback(metrics: Metrics, readiness: SwitchedReadiness) -> None:
    endpoint = OperatorHTTP(metrics=metrics, ready=readiness)
    readiness.ready = True
    assert endpoint.respond(get("/readyz")).body == b"ready"
    readiness.ready = False
    assert endpoint.respond(get("/readyz")).status == 503


def test_readyz_says_what_is_degraded_and_stays_ready(
    metrics: Metrics, readiness: SwitchedReadiness
) -> None:
    endpoint = OperatorHTTP(metrics=metrics, ready=readiness)
    readiness.ready = True
    readiness.degraded = ("registry: no answer within 0.2 s", "rate limits: per replica")
    response = endpoint.respond(get("/readyz"))
    assert (response.status, response.body) == (
        200,
        b"degraded: registry: no answer within 0.2 s; rate limits: per replica",
    )
    readiness.ready = False
    assert endpoint.respond(get("/readyz")).body == b"not ready"


def test_query_string_is_ignored(metrics: Metrics, readiness: SwitchedReadiness) -> None:
    response = OperatorHTTP(metrics=metrics, ready=readiness).respond(get("/metrics?format=x"))
    assert (response.status, response.content_type) == (200, metrics.exposition()[1])


def test_other_methods_are_405_with_allow(metrics: Metrics, readiness: SwitchedReadiness) -> None:
    endpoint = OperatorHTTP(metrics=metrics, ready=readiness)
    for method in ("POST", "DELETE", "OPTIONS"):
        response = endpoint.respond(get("/metrics", method))
        assert (response.status, response.headers) == (405, (("Allow", "GET, HEAD"),))
    assert endpoint.respond(get("/nowhere", "POST")).status == 404


# Over sockets

Start = Callable[..., Awaitable[tuple[OperatorHTTP, int]]]


@pytest.fixture
async def start(metrics: Metrics, readiness: SwitchedReadiness) -> AsyncIterator[Start]:
    servers: list[OperatorHTTP] = []

    async def start(**options: Any) -> tuple[OperatorHTTP, int]:
        server = OperatorHTTP(metrics=metrics, ready=readiness, **options)
        servers.append(server)
        host, port = await server.start("127.0.0.1", 0)
        assert host == "127.0.0.1"
        return server, port

    yield start
    for server in servers:
        await server.stop()


async def test_metrics_are_served_as_prometheus_text(start: Start, metrics: Metrics) -> None:
    _, port = await start()
    metrics.test_started()
    metrics.refused("busy")

    status, headers, body = await request(port, "GET", "/metrics")

    assert status == 200
    assert headers["Content-Type"] == metrics.exposition()[1]
    assert headers["Connection"] == "close"
    values = {
        (sample.name, tuple(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert values["relayprobe_tests_started_total", ()] == 1
    assert values["relayprobe_refusals_total", (("reason", "busy"),)] == 1
    assert values["relayprobe_refusals_total", (("reason", "access"),)] == 0


async def test_health_and_readiness_over_http(start: Start, readiness: SwitchedReadiness) -> None:
    _, port = await start()
    assert (await request(port, "GET", "/healthz"))[::2] == (200, b"ok")
    assert (await request(port, "GET", "/readyz"))[::2] == (503, b"not ready")
    readiness.ready = True
    assert (await request(port, "GET", "/readyz"))[::2] == (200, b"ready")
    assert (await request(port, "GET", "/"))[0] == 404


async def test_head_sends_headers_only(start: Start) -> None:
    _, port = await start()
    status, headers, body = await request(port, "HEAD", "/healthz")
    assert (status, headers["Content-Length"], body) == (200, "2", b"")
    raw = await exchange_bytes(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n")


async def test_other_methods_are_405_and_bodies_413(start: Start) -> None:
    _, port = await start()
    status, headers, _ = await request(port, "POST", "/metrics", body=b"")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert (await request(port, "DELETE", "/readyz"))[0] == 405
    # The endpoint reads no bodies at all.
    assert (await request(port, "POST", "/metrics", body=b"x" * 20_000))[0] == 413


async def test_malformed_request_is_400(start: Start) -> None:
    _, port = await start()
    response = await exchange_bytes(port, b"GET / HTTP/1.1\r\nHost: h\r\nbroken\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def assert_ready_within_1s(port: int) -> None:
    started = time.monotonic()
    assert (await request(port, "GET", "/readyz"))[::2] == (200, b"ready")
    assert time.monotonic() - started < 1


async def test_health_check_is_answered_during_a_slowloris_from_its_own_address(
    start: Start, readiness: SwitchedReadiness
) -> None:
    readiness.ready = True
    _, port = await start()
    slow = await open_slow(port, ["127.0.0.1"] * 40)
    try:
        for _ in range(3):
            await assert_ready_within_1s(port)
            slow += await open_slow(port, ["127.0.0.1"] * 10)
    finally:
        close_all(slow)


async def test_health_check_is_answered_during_a_slowloris_from_many_addresses(
    start: Start, readiness: SwitchedReadiness
) -> None:
    readiness.ready = True
    _, port = await start()
    slow = await open_slow(port, [f"127.0.2.{n}" for n in range(1, 65)])
    try:
        for round_ in range(3):
            await assert_ready_within_1s(port)
            slow += await open_slow(port, [f"127.0.{3 + round_}.{n}" for n in range(1, 33)])
    finally:
        close_all(slow)


async def test_request_line_deadline_is_passed_on(start: Start) -> None:
    _, port = await start(timeout_s=5.0, request_line_timeout_s=0.3)
    opened = time.monotonic()
    (reader, writer), *_ = await open_slow(port, ["127.0.0.1"])
    assert (await read_to_end(reader, within_s=5)).startswith(b"HTTP/1.1 408 ")
    assert 0.3 <= time.monotonic() - opened < 1
    writer.close()


class HugeMetrics(Metrics):
    """Metrics too big for the socket buffers, so a client that does not read holds its slot."""

    def exposition(self) -> tuple[bytes, str]:
        return b"x" * 16_000_000, "text/plain"


async def test_with_every_slot_answering_a_newcomer_is_told_busy_not_unready(
    readiness: SwitchedReadiness,
) -> None:
    server = OperatorHTTP(metrics=HugeMetrics(), ready=readiness, max_connections=1)
    _, port = await server.start("127.0.0.1", 0)
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        holder.connect(("127.0.0.1", port))
        holder.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)

        status, headers, body = await request(port, "GET", "/readyz")
        assert (status, headers["Retry-After"]) == (503, "1")
        assert body.startswith(b"busy: ") and b"not an answer from the service" in body

        holder.close()
        await asyncio.sleep(0.2)
        assert (await request(port, "GET", "/readyz"))[::2] == (503, b"not ready")
    finally:
        holder.close()
        await server.stop()


async def test_stop_drops_open_connections_quietly(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await start(timeout_s=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /")
    await asyncio.sleep(0.1)

    async with asyncio.timeout(5):
        await server.stop()
        assert await reader.read() == b""
    writer.close()
    await asyncio.sleep(0.1)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


def test_rejects_invalid_options(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        OperatorHTTP(metrics=metrics, ready=lambda: Readiness(True), timeout_s=0)
    with pytest.raises(ValueError, match="request_line_timeout_s"):
        OperatorHTTP(metrics=metrics, ready=lambda: Readiness(True), request_line_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections "):
        OperatorHTTP(metrics=metrics, ready=lambda: Readiness(True), max_connections=0)
    with pytest.raises(ValueError, match="max_connections_per_source"):
        OperatorHTTP(metrics=metrics, ready=lambda: Readiness(True), max_connections_per_source=0)
