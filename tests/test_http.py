from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from relayprobe.http import (
    MAX_HEAD_BYTES,
    BadRequest,
    HeadTooLarge,
    OperatorHTTP,
    Request,
    Response,
    parse_request_head,
)
from relayprobe.metrics import Metrics

# Parser


def test_parses_a_request_head() -> None:
    request = parse_request_head(
        b"GET /metrics?name[]=x HTTP/1.1\r\n"
        b"Host: 127.0.0.1:9100\r\n"
        b"Accept:  text/plain;q=0.9 \t\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
    )
    assert request == Request(
        method="GET",
        target="/metrics?name[]=x",
        version="HTTP/1.1",
        headers=(("host", "127.0.0.1:9100"), ("accept", "text/plain;q=0.9"), ("x-empty", "")),
    )
    assert request.path == "/metrics"


def test_http10_needs_no_host() -> None:
    request = parse_request_head(b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert (request.method, request.path, request.headers) == ("HEAD", "/healthz", ())


def test_header_values_are_latin1() -> None:
    request = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\r\n\r\n")
    assert request.headers[1] == ("x-name", "caf\u00e9")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n",
        b"GET / HTTP/1.1\nHost: h\n\n",
        b"GET / HTTP/1.1\r\nHost: h\n\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / http/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n continued\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\nX-A: 1\r\n\r\n",
    ],
)
def test_rejects_malformed_heads(data: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request_head(data)


def test_rejects_an_oversized_head() -> None:
    line = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
    fitting = line + b"a" * (MAX_HEAD_BYTES - len(line) - 4) + b"\r\n\r\n"
    assert len(fitting) == MAX_HEAD_BYTES
    assert parse_request_head(fitting).headers[1][0] == "x-pad"
    with pytest.raises(HeadTooLarge):
        parse_request_head(line + b"a" * (MAX_HEAD_BYTES - len(line) - 3) + b"\r\n\r\n")
    assert issubclass(HeadTooLarge, BadRequest)
    assert issubclass(BadRequest, ValueError)


_HEAD_PIECES = [b"GET", b"HEAD", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"Host", b":", b"h"]
_HEAD_PIECES += [b"\x00", b"\xff", b"\t", b"\r", b"\n", b"\xc3\xa9"]


@given(st.binary(max_size=200) | st.lists(st.sampled_from(_HEAD_PIECES)).map(b"".join))
def test_any_bytes_parse_or_raise_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        request = parse_request_head(data)
        assert request.method.isascii() and request.target.startswith("/")


def test_head_response_keeps_the_length_of_the_body() -> None:
    response = Response(status=HTTPStatus.OK, body=b"ready")
    full = response.render(head_only=False, date="Thu, 01 Jan 2026 00:00:00 GMT")
    head = response.render(head_only=True, date="Thu, 01 Jan 2026 00:00:00 GMT")
    assert full == head + b"ready"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 5\r\n" in head
    assert b"\r\nConnection: close\r\n" in head
    assert head.endswith(b"\r\n\r\n")


# Server

Start = Callable[..., Awaitable[tuple[OperatorHTTP, int]]]


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def start(metrics: Metrics, readiness: Readiness) -> AsyncIterator[Start]:
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


async def request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A request by the standard library's client, which checks our framing."""

    def run() -> tuple[int, http.client.HTTPMessage, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    return await asyncio.to_thread(run)


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            return await reader.read(100_000)
    finally:
        writer.close()


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


async def test_query_string_is_ignored(start: Start) -> None:
    _, port = await start()
    status, _, _ = await request(port, "GET", "/metrics?format=text")
    assert status == 200


async def test_healthz(start: Start) -> None:
    _, port = await start()
    assert (await request(port, "GET", "/healthz"))[::2] == (200, b"ok")


async def test_head_sends_headers_only(start: Start) -> None:
    _, port = await start()
    status, headers, body = await request(port, "HEAD", "/healthz")
    assert (status, headers["Content-Length"], body) == (200, "2", b"")
    raw = await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n")


async def test_readyz_follows_the_callback(start: Start, readiness: Readiness) -> None:
    _, port = await start()
    assert (await request(port, "GET", "/readyz"))[::2] == (503, b"not ready")
    readiness.ready = True
    assert (await request(port, "GET", "/readyz"))[::2] == (200, b"ready")
    readiness.ready = False
    assert (await request(port, "GET", "/readyz"))[0] == 503


async def test_unknown_path_is_404(start: Start) -> None:
    _, port = await start()
    assert (await request(port, "GET", "/"))[0] == 404
    assert (await request(port, "POST", "/nowhere", body=b"x"))[0] == 404


async def test_other_methods_are_405(start: Start) -> None:
    _, port = await start()
    status, headers, _ = await request(port, "POST", "/metrics", body=b"x" * 20_000)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert (await request(port, "DELETE", "/readyz"))[0] == 405


async def test_malformed_request_is_400(start: Start) -> None:
    _, port = await start()
    response = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nbroken\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_oversized_head_is_431(start: Start) -> None:
    _, port = await start()
    response = await exchange(port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES)
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_client_closing_early_gets_nothing(start: Start) -> None:
    _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_slowloris_is_dropped_and_does_not_block_others(start: Start) -> None:
    _, port = await start(timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    opened = time.monotonic()

    assert (await request(port, "GET", "/healthz"))[0] == 200
    assert time.monotonic() - opened < 0.5

    async with asyncio.timeout(5):
        response = await reader.read()
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - opened >= 0.5
    writer.close()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_slow(port: int, sources: Sequence[str]) -> list[Connection]:
    """A slowloris connection from each source address: part of a request line, then nothing."""
    connections = []
    for source in sources:
        connection = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        connection[1].write(b"GET /rea")
        connections.append(connection)
    await asyncio.sleep(0.1)  # for the server to take them in
    return connections


def close_all(connections: Sequence[Connection]) -> None:
    for _, writer in connections:
        writer.close()


async def read_to_end(reader: asyncio.StreamReader, *, within_s: float) -> bytes:
    """What the server sends before it closes (b"" if it resets the connection)."""
    try:
        async with asyncio.timeout(within_s):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.1):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


async def assert_ready_within_1s(port: int) -> None:
    started = time.monotonic()
    assert (await request(port, "GET", "/readyz"))[::2] == (200, b"ready")
    assert time.monotonic() - started < 1


async def test_health_check_is_answered_during_a_slowloris_from_its_own_address(
    start: Start, readiness: Readiness
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
    start: Start, readiness: Readiness
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


async def test_request_line_has_a_short_deadline_of_its_own(start: Start) -> None:
    _, port = await start(timeout_s=5.0, request_line_timeout_s=0.3)
    opened = time.monotonic()
    (reader, writer), *_ = await open_slow(port, ["127.0.0.1"])
    assert (await read_to_end(reader, within_s=5)).startswith(b"HTTP/1.1 408 ")
    assert 0.3 <= time.monotonic() - opened < 1
    writer.close()

    # Once the request line is in, the rest of the head may take up to timeout_s.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await asyncio.sleep(0.5)
    writer.write(b"Host: x\r\n\r\n")
    assert (await read_to_end(reader, within_s=5)).startswith(b"HTTP/1.1 200 OK\r\n")
    writer.close()


async def test_a_source_at_its_cap_loses_its_oldest_waiting_connection(start: Start) -> None:
    _, port = await start(max_connections_per_source=2, request_line_timeout_s=5.0)
    others = await open_slow(port, ["127.0.0.2"] * 2)
    mine = await open_slow(port, ["127.0.0.3"] * 2)
    try:
        mine += await open_slow(port, ["127.0.0.3"])
        assert await read_to_end(mine[0][0], within_s=1) == b""
        for reader, _ in [*others, *mine[1:]]:
            assert await still_open(reader)
    finally:
        close_all([*others, *mine])


async def test_a_full_endpoint_drops_its_oldest_waiting_connection(
    start: Start, readiness: Readiness
) -> None:
    readiness.ready = True
    _, port = await start(max_connections=2, request_line_timeout_s=5.0)
    slow = await open_slow(port, ["127.0.0.2", "127.0.0.3"])
    try:
        assert (await request(port, "GET", "/readyz"))[::2] == (200, b"ready")
        assert await read_to_end(slow[0][0], within_s=1) == b""
        assert await still_open(slow[1][0])
    finally:
        close_all(slow)


class HugeMetrics(Metrics):
    """Metrics too big for the socket buffers, so a client that does not read holds its slot."""

    def exposition(self) -> tuple[bytes, str]:
        return b"x" * 16_000_000, "text/plain"


async def test_with_every_slot_answering_a_newcomer_is_told_busy_not_unready(
    readiness: Readiness,
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
        assert body.startswith(b"busy: ") and b"says nothing about readiness" in body

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
        OperatorHTTP(metrics=metrics, ready=lambda: True, timeout_s=0)
    with pytest.raises(ValueError, match="request_line_timeout_s"):
        OperatorHTTP(metrics=metrics, ready=lambda: True, request_line_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections "):
        OperatorHTTP(metrics=metrics, ready=lambda: True, max_connections=0)
    with pytest.raises(ValueError, match="max_connections_per_source"):
        OperatorHTTP(metrics=metrics, ready=lambda: True, max_connections_per_source=0)
