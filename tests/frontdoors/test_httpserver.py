from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relayprobe.frontdoors.addresses import IPAddress
from relayprobe.frontdoors.httpserver import (
    BUSY,
    MAX_HEAD_BYTES,
    MAX_QUERY_FIELDS,
    Exchange,
    ExchangeCodec,
    Handler,
    HTTPServer,
    Request,
    Response,
    choose_victim,
    render_response,
)
from relayprobe.frontdoors.proxyproto import V2_SIGNATURE

PEER = ipaddress.IPv4Address("192.0.2.1")


def codec(max_body_bytes: int = 0) -> ExchangeCodec:
    return ExchangeCodec(peer=PEER, max_body_bytes=max_body_bytes)


def status_of(outcome: Request | Response | None) -> HTTPStatus | None:
    assert not isinstance(outcome, Request)
    return None if outcome is None else outcome.status


# Reading a request


def test_reads_a_request() -> None:
    request = codec().receive(
        b"GET /metrics?name[]=x HTTP/1.1\r\n"
        b"Host: 127.0.0.1:9100\r\n"
        b"Accept:  text/plain;q=0.9 \t\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
    )
    assert request == Request(
        method="GET",
        target="/metrics?name[]=x",
        headers=(("host", "127.0.0.1:9100"), ("accept", "text/plain;q=0.9"), ("x-empty", "")),
        peer=PEER,
    )
    assert request.path == "/metrics"


def test_reads_a_request_byte_by_byte_and_notices_its_request_line() -> None:
    reader = codec()
    data = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    outcomes = []
    for index in range(len(data)):
        outcomes.append(reader.receive(data[index : index + 1]))
        assert reader.request_line_received == (index >= data.index(b"\n"))
    assert outcomes[:-1] == [None] * (len(data) - 1)
    assert isinstance(outcomes[-1], Request)


def test_http10_needs_no_host_and_values_are_latin1() -> None:
    request = codec().receive(b"HEAD /healthz HTTP/1.0\r\nX-Name: caf\xe9\r\n\r\n")
    assert isinstance(request, Request)
    assert (request.method, request.path, request.headers) == (
        "HEAD",
        "/healthz",
        (("x-name", "caf\u00e9"),),
    )


def test_header_is_the_first_value_of_a_name_in_any_case() -> None:
    request = Request("GET", "/", (("accept", "a"), ("accept", "b")), PEER)
    assert request.header("Accept") == "a"
    assert request.header("origin") is None


def test_query_last_value_wins_and_is_decoded() -> None:
    request = Request("GET", "/p?format=text&x&format=ndjson&n=caf%C3%A9+1&bad=%ff", (), PEER)
    assert request.query == {"format": "ndjson", "x": "", "n": "café 1", "bad": "\ufffd"}
    assert Request("GET", "/p", (), PEER).query == {}


def test_query_counts_only_the_first_fields() -> None:
    target = "/?" + "&".join(f"f{n}=1" for n in range(10 * MAX_QUERY_FIELDS))
    query = Request("GET", target, (), PEER).query
    assert list(query) == [f"f{n}" for n in range(MAX_QUERY_FIELDS)]


@given(st.text(max_size=300))
def test_any_target_gives_a_bounded_query(target: str) -> None:
    assert len(Request("GET", "/?" + target, (), PEER).query) <= MAX_QUERY_FIELDS


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / http/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
        # Targets other than origin-form: absolute, asterisk, authority (CONNECT).
        b"GET http://example.com/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n",
        # Both framings: a smuggling attempt.
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_malformed_requests_are_400(data: bytes) -> None:
    assert status_of(codec(max_body_bytes=10).receive(data)) == HTTPStatus.BAD_REQUEST


def test_other_http_versions_are_505() -> None:
    outcome = codec().receive(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n")
    assert status_of(outcome) == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


def test_unknown_transfer_codings_are_501() -> None:
    outcome = codec(10).receive(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert status_of(outcome) == HTTPStatus.NOT_IMPLEMENTED


def test_head_of_max_size_fits_and_one_byte_more_is_431() -> None:
    start = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
    fitting = start + b"a" * (MAX_HEAD_BYTES - len(start) - 4) + b"\r\n\r\n"
    assert len(fitting) == MAX_HEAD_BYTES
    assert isinstance(codec().receive(fitting), Request)
    too_large = start + b"a" * (MAX_HEAD_BYTES - len(start) - 3) + b"\r\n\r\n"
    assert status_of(codec().receive(too_large)) == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_a_head_that_never_ends_is_431_as_soon_as_it_is_over_the_limit() -> None:
    reader = codec()
    assert reader.receive(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES - 30)) is None
    assert status_of(reader.receive(b"a" * 100)) == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_a_megabyte_head_is_refused_without_buffering_it() -> None:
    data = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2**20
    tracemalloc.start()
    try:
        outcome = codec().receive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status_of(outcome) == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    assert peak < 8 * MAX_HEAD_BYTES


def test_a_body_within_the_limit_is_read() -> None:
    request = codec(5).receive(b"POST /f HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\na=1&b")
    assert isinstance(request, Request)
    assert request.body == b"a=1&b"


def test_a_chunked_body_within_the_limit_is_read() -> None:
    reader = codec(5)
    head = b"POST /f HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert reader.receive(head + b"3\r\na=1\r\n") is None
    request = reader.receive(b"2\r\n&b\r\n0\r\n\r\n")
    assert isinstance(request, Request)
    assert request.body == b"a=1&b"


def test_a_declared_body_over_the_limit_is_413_before_it_arrives() -> None:
    outcome = codec(5).receive(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\n")
    assert status_of(outcome) == HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def test_a_chunked_body_over_the_limit_is_413() -> None:
    reader = codec(5)
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert reader.receive(head + b"5\r\naaaaa\r\n") is None
    assert status_of(reader.receive(b"1\r\na\r\n")) == HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def test_a_huge_content_length_is_refused() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"
    outcome = codec(5).receive(head)
    assert status_of(outcome) in (
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
    )


_PIECES = [b"GET", b"POST", b"HEAD", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n"]
_PIECES += [b"Host", b":", b"h", b"Content-Length", b"Transfer-Encoding", b"chunked", b"0"]
_PIECES += [b"1", b"\x00", b"\xff", b"\t", b"\r", b"\xc3\xa9", b"PROXY", b"*"]


@given(st.lists(st.binary(max_size=50) | st.lists(st.sampled_from(_PIECES)).map(b"".join)))
def test_any_bytes_give_a_request_an_error_or_a_wait(pieces: list[bytes]) -> None:
    reader = codec(max_body_bytes=8)
    for piece in pieces:
        outcome = reader.receive(piece)
        if isinstance(outcome, Request):
            assert outcome.target.startswith("/") and outcome.method.isascii()
            assert len(outcome.body) <= 8
            return
        if outcome is not None:
            assert outcome.status >= 400
            return


# Writing the response


def client_reading(method: str = "GET") -> h11.Connection:
    """An h11 client that has sent `method` /, to check what the server writes."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    return client


def events(client: h11.Connection, data: bytes) -> list[Any]:
    """The events `data` completes."""
    if data:  # b"" would mean the end of the connection
        client.receive_data(data)
    found: list[Any] = []
    while (event := client.next_event()) is not h11.NEED_DATA:
        found.append(event)
        if isinstance(event, h11.ConnectionClosed | h11.EndOfMessage):
            break
    return found


def received(head: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> ExchangeCodec:
    exchange = codec()
    assert isinstance(exchange.receive(head), Request)
    return exchange


def test_a_whole_response_as_a_client_reads_it() -> None:
    exchange = received()
    data = exchange.respond(Response(HTTPStatus.OK, b"ready", headers=(("X-Extra", "1"),)))
    response, body, end = events(client_reading(), data)
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (200, b"OK")
    headers = dict(response.headers)
    assert headers[b"content-length"] == b"5"
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert headers[b"connection"] == b"close"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"x-extra"] == b"1"
    assert b"date" in headers
    assert body.data == b"ready"
    assert isinstance(end, h11.EndOfMessage)
    assert exchange.response_complete


def test_a_handler_may_replace_the_default_headers() -> None:
    data = received().respond(
        Response(HTTPStatus.OK, b"x", headers=(("Cache-Control", "max-age=60"),))
    )
    response = events(client_reading(), data)[0]
    assert [v for n, v in response.headers if n == b"cache-control"] == [b"max-age=60"]
    assert data.count(b"nosniff") == 1


def test_head_gets_the_head_with_the_length_of_the_body() -> None:
    data = received(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").respond(
        Response(HTTPStatus.OK, b"ready")
    )
    assert b"\r\nContent-Length: 5\r\n" in data
    assert data.endswith(b"\r\n\r\n")
    response, end = events(client_reading("HEAD"), data)
    assert response.status_code == 200 and isinstance(end, h11.EndOfMessage)


def test_an_error_after_a_head_request_has_no_body() -> None:
    exchange = codec()
    refusal = exchange.receive(b"HEAD http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(refusal, Response)
    assert exchange.respond(refusal).endswith(b"\r\n\r\n")


def test_a_stream_is_chunked_and_each_piece_readable_at_once() -> None:
    exchange = received()
    client = client_reading()
    head = exchange.start_stream(HTTPStatus.OK, "text/plain", (("X-Accel-Buffering", "no"),))
    (response,) = events(client, head)
    assert dict(response.headers)[b"transfer-encoding"] == b"chunked"
    assert exchange.response_started and not exchange.response_complete
    for piece in (b"one\n", b"", b"three\n"):
        data = exchange.stream(piece)
        assert [event.data for event in events(client, data)] == ([piece] if piece else [])
    # The CRLF ending the last chunk is held back, and written as a probe.
    assert exchange.probe() == b"\r\n"
    assert exchange.probe() == b""
    assert events(client, b"\r\n") == []
    assert isinstance(events(client, exchange.end_stream())[-1], h11.EndOfMessage)
    assert exchange.response_complete


def test_a_stream_ends_with_the_held_back_crlf() -> None:
    exchange = received()
    client = client_reading()
    data = exchange.start_stream(HTTPStatus.OK, "text/plain", ()) + exchange.stream(b"x")
    data += exchange.end_stream()
    assert data.endswith(b"1\r\nx\r\n0\r\n\r\n")
    assert isinstance(events(client, data)[-1], h11.EndOfMessage)


def test_a_stream_to_http10_is_delimited_by_the_close() -> None:
    exchange = received(b"GET / HTTP/1.0\r\n\r\n")
    head = exchange.start_stream(HTTPStatus.OK, "text/plain", ())
    assert b"transfer-encoding" not in head.lower()
    assert exchange.stream(b"line\n") == b"line\n"
    assert exchange.probe() == b""
    assert exchange.end_stream() == b""


def test_a_stream_to_head_has_no_body() -> None:
    exchange = received(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = exchange.start_stream(HTTPStatus.OK, "text/plain", ())
    assert exchange.stream(b"line\n") == b""
    assert exchange.end_stream() == b""
    assert isinstance(events(client_reading("HEAD"), head)[-1], h11.EndOfMessage)


def test_sending_out_of_order_raises() -> None:
    with pytest.raises(h11.LocalProtocolError):
        received().stream(b"no head yet")
    exchange = received()
    exchange.respond(Response(HTTPStatus.OK))
    with pytest.raises(h11.LocalProtocolError):
        exchange.respond(Response(HTTPStatus.OK))


def test_busy_is_503_with_retry_after() -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    response, body, _ = events(client, render_response(BUSY))
    assert response.status_code == 503
    assert dict(response.headers)[b"retry-after"] == b"1"
    assert body.data.startswith(b"busy: ")


# Choosing a victim


@dataclass
class FakeSlot:
    source: IPAddress | None
    evictable: bool = True


A, B = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("192.0.2.2")


def room(others: Sequence[FakeSlot], source: IPAddress | None) -> tuple[bool, int | None]:
    found = choose_victim(others, source, max_connections=4, max_per_source=2)
    victim = (
        None
        if found.victim is None
        else next(index for index, slot in enumerate(others) if slot is found.victim)
    )
    return found.admitted, victim


def test_a_newcomer_below_the_caps_evicts_no_one() -> None:
    assert room([], A) == (True, None)
    assert room([FakeSlot(A), FakeSlot(B), FakeSlot(B)], A) == (True, None)


def test_victim_from_a_source_at_its_cap_is_its_oldest_waiting_connection() -> None:
    others = [FakeSlot(A, evictable=False), FakeSlot(B), FakeSlot(A), FakeSlot(A)]
    assert room(others, A) == (True, 2)


def test_victim_on_a_full_server_is_the_oldest_waiting_connection_of_any_source() -> None:
    others = [FakeSlot(A, evictable=False), FakeSlot(B, evictable=False), FakeSlot(None)]
    assert room([*others, FakeSlot(B)], A) == (True, 2)


def test_with_nothing_to_evict_the_newcomer_is_refused() -> None:
    assert room([FakeSlot(A, evictable=False)] * 2, A) == (False, None)
    assert room([FakeSlot(B, evictable=False)] * 4, A) == (False, None)


def test_an_unknown_source_counts_against_the_total_only() -> None:
    assert room([FakeSlot(None), FakeSlot(None)], None) == (True, None)
    assert room([FakeSlot(A), FakeSlot(A)], None) == (True, None)
    assert room([FakeSlot(None)] * 4, None) == (True, 0)


# Over sockets

Serve = Callable[..., Awaitable[tuple[HTTPServer, int]]]


async def hello(request: Request, exchange: Exchange) -> None:
    body = f"{request.method} {request.target} from {request.peer}: ".encode() + request.body
    exchange.respond(Response(HTTPStatus.OK, body))


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[HTTPServer] = []

    async def serve(handler: Handler = hello, **options: Any) -> tuple[HTTPServer, int]:
        server = HTTPServer(handler, **options)
        servers.append(server)
        host, port = await server.start("127.0.0.1", 0)
        assert host == "127.0.0.1"
        return server, port

    yield serve
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


async def exchange_bytes(port: int, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_to_end(reader, within_s=5)
    finally:
        writer.close()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_slow(
    port: int, sources: Sequence[str], *, first: bytes = b"GET /rea"
) -> list[Connection]:
    """A slowloris connection from each source address: part of a request line, then nothing."""
    connections = []
    for source in sources:
        connection = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        connection[1].write(first)
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


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readuntil(marker)


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.1):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


async def eventually(predicate: Callable[[], bool], *, within_s: float = 5) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():
            await asyncio.sleep(0.01)


def handler_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if "_run_handler" in getattr(task.get_coro(), "__qualname__", "")
    ]


GET = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_answers_a_request_and_closes(serve: Serve) -> None:
    server, port = await serve()
    status, headers, body = await request(port, "GET", "/a?b=c")
    assert (status, body) == (200, b"GET /a?b=c from 127.0.0.1: ")
    assert headers["Connection"] == "close"
    await eventually(lambda: server.connections == 0)


async def test_a_small_body_reaches_the_handler(serve: Serve) -> None:
    _, port = await serve(max_body_bytes=16)
    assert (await request(port, "POST", "/run", body=b"go=1"))[::2] == (
        200,
        b"POST /run from 127.0.0.1: go=1",
    )


async def test_a_body_over_the_limit_is_413(serve: Serve) -> None:
    _, port = await serve(max_body_bytes=16)
    response = await exchange_bytes(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n"
    )
    assert response.startswith(b"HTTP/1.1 413 ")


async def test_a_slow_body_is_408_after_the_request_timeout(serve: Serve) -> None:
    _, port = await serve(max_body_bytes=16, timeout_s=0.5)
    opened = time.monotonic()
    response = await exchange_bytes(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf"
    )
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - opened >= 0.5


async def test_malformed_request_is_400(serve: Serve) -> None:
    _, port = await serve()
    response = await exchange_bytes(port, b"GET / HTTP/1.1\r\nHost: h\r\nbroken\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_oversized_head_is_431(serve: Serve) -> None:
    _, port = await serve()
    response = await exchange_bytes(port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES)
    assert response.startswith(b"HTTP/1.1 431 ")


async def test_a_megabyte_head_is_431(serve: Serve) -> None:
    server, port = await serve()
    response = await exchange_bytes(port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2**20)
    assert response.startswith(b"HTTP/1.1 431 ")
    await eventually(lambda: server.connections == 0)


async def test_megabyte_heads_do_not_grow_memory(serve: Serve) -> None:
    server, port = await serve(max_connections=64, max_connections_per_source=64)
    payload = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2**20
    attackers = 16

    def attack() -> None:
        # The server resets the connection once it has had enough.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            contextlib.suppress(OSError),
        ):
            sock.sendall(payload)
            sock.recv(4096)

    tracemalloc.start()
    try:
        await asyncio.gather(*(asyncio.to_thread(attack) for _ in range(attackers)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The attackers sent 16 MiB; the server held a few reads of it at most.
    assert peak < 2 * 2**20
    await eventually(lambda: server.connections == 0)


async def test_client_closing_before_its_request_is_complete_gets_nothing(serve: Serve) -> None:
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    writer.write_eof()
    assert await read_to_end(reader, within_s=5) == b""
    writer.close()


async def test_slowloris_is_408_and_does_not_block_others(serve: Serve) -> None:
    _, port = await serve(timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    opened = time.monotonic()

    assert (await request(port, "GET", "/healthz"))[0] == 200
    assert time.monotonic() - opened < 0.5

    response = await read_to_end(reader, within_s=5)
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - opened >= 0.5
    writer.close()


async def test_request_line_has_a_short_deadline_of_its_own(serve: Serve) -> None:
    _, port = await serve(timeout_s=5.0, request_line_timeout_s=0.3)
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


async def test_a_source_at_its_cap_loses_its_oldest_waiting_connection(serve: Serve) -> None:
    _, port = await serve(max_connections_per_source=2, request_line_timeout_s=5.0)
    others = await open_slow(port, ["127.0.0.2"] * 2)
    mine = await open_slow(port, ["127.0.0.3"] * 2)
    try:
        mine += await open_slow(port, ["127.0.0.3"])
        assert await read_to_end(mine[0][0], within_s=1) == b""
        for reader, _ in [*others, *mine[1:]]:
            assert await still_open(reader)
    finally:
        close_all([*others, *mine])


async def test_a_full_server_drops_its_oldest_waiting_connection(serve: Serve) -> None:
    _, port = await serve(max_connections=2, request_line_timeout_s=5.0)
    slow = await open_slow(port, ["127.0.0.2", "127.0.0.3"])
    try:
        assert (await request(port, "GET", "/"))[0] == 200
        assert await read_to_end(slow[0][0], within_s=1) == b""
        assert await still_open(slow[1][0])
    finally:
        close_all(slow)


class Gate:
    """A handler that starts a stream, then waits until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()
        self.exchanges: list[Exchange] = []
        self.outcomes: list[str] = []

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        self.entered.set()
        try:
            exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
            exchange.send(b"first\n")
            await self.opened.wait()
            exchange.send(b"last\n")
            await exchange.end_stream()
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("gone" if exchange.gone else "finished")


async def test_with_every_slot_answering_a_newcomer_is_told_busy(serve: Serve) -> None:
    refusals: list[str] = []
    gate = Gate()
    _, port = await serve(gate, max_connections=1, on_refused=refusals.append)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    await read_until(reader, b"first\n")

    status, headers, body = await request(port, "GET", "/")
    assert (status, headers["Retry-After"]) == (503, "1")
    assert body.startswith(b"busy: ")
    assert refusals == ["busy"]

    gate.opened.set()
    assert (await read_to_end(reader, within_s=5)).endswith(b"last\n\r\n0\r\n\r\n")
    writer.close()
    assert (await request(port, "GET", "/"))[0] == 200


async def test_a_stream_arrives_piece_by_piece(serve: Serve) -> None:
    step = asyncio.Event()

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        for line in (b"one\n", b"two\n", b"three\n"):
            exchange.send(line)
            await step.wait()
            step.clear()
        await exchange.end_stream()

    _, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    head = await read_until(reader, b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    # Each piece arrives while the handler waits: nothing is buffered on our side.
    assert await read_until(reader, b"one\n") == b"4\r\none\n"
    step.set()
    assert await read_until(reader, b"two\n") == b"\r\n4\r\ntwo\n"
    step.set()
    assert await read_until(reader, b"three\n") == b"\r\n6\r\nthree\n"
    step.set()
    assert await read_to_end(reader, within_s=5) == b"\r\n0\r\n\r\n"
    writer.close()


async def test_send_from_a_synchronous_callback(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for n in range(3):
            loop.call_soon(exchange.send, f"event {n}\n".encode())
        loop.call_soon(done.set)
        await done.wait()
        await exchange.end_stream()

    _, port = await serve(handler)
    status, _, body = await request(port, "GET", "/")
    assert (status, body) == (200, b"event 0\nevent 1\nevent 2\n")


async def test_http10_client_gets_the_stream_until_the_close(serve: Serve) -> None:
    gate = Gate()
    gate.opened.set()
    _, port = await serve(gate)
    response = await exchange_bytes(port, b"GET / HTTP/1.0\r\n\r\n")
    assert response.endswith(b"\r\n\r\nfirst\nlast\n")
    assert b"chunked" not in response


def leave(writer: asyncio.StreamWriter, how: str) -> None:
    """Hang up: close the socket (FIN), or reset the connection."""
    if how == "reset":
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()
    else:
        writer.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_hang_up_cancels_the_handler_within_1s(serve: Serve, how: str) -> None:
    gate = Gate()
    server, port = await serve(gate)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    await read_until(reader, b"first\n")
    # The handler now writes nothing; a FIN alone could be a half-close.
    leave(writer, how)
    left = time.monotonic()
    await eventually(lambda: gate.outcomes == ["cancelled"], within_s=1)
    assert time.monotonic() - left < 1
    assert gate.exchanges[0].gone
    await eventually(lambda: server.connections == 0)


async def test_half_closed_client_still_reading_gets_the_whole_stream(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        for n in range(5):
            await exchange.client_present()
            exchange.send(f"line {n}\n".encode())
            await asyncio.sleep(0.05)
        await exchange.end_stream()

    _, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    writer.write_eof()
    response = await read_to_end(reader, within_s=5)
    writer.close()
    client = client_reading()
    found = events(client, response)
    assert b"".join(event.data for event in found if isinstance(event, h11.Data)) == b"".join(
        f"line {n}\n".encode() for n in range(5)
    )
    assert isinstance(found[-1], h11.EndOfMessage)


async def test_client_present_raises_once_the_client_is_gone(serve: Serve) -> None:
    checked = asyncio.Event()
    outcome: list[str] = []

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        await exchange.client_present()  # present: returns at once
        exchange.send(b"first\n")
        await checked.wait()
        try:
            while True:
                exchange.send(b"more\n")
                await exchange.client_present()
        except asyncio.CancelledError:
            outcome.append("gone" if exchange.gone else "cancelled, not gone")
            raise

    _, port = await serve(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    writer.write_eof()  # a half-close first: the client may still be reading
    await read_until(reader, b"first\n")
    writer.close()
    checked.set()
    await eventually(lambda: outcome == ["gone"], within_s=1)


async def test_a_client_that_never_reads_is_cut_off_by_the_buffer_cap(serve: Serve) -> None:
    refusals: list[str] = []
    sent: list[int] = []

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        while True:
            exchange.send(b"x" * 65536)
            sent.append(65536)
            await asyncio.sleep(0)

    server, port = await serve(
        handler, output_buffer_bytes=256 * 1024, write_timeout_s=30, on_refused=refusals.append
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(GET)
        await eventually(lambda: refusals == ["slow_client"])
        await eventually(lambda: server.connections == 0 and not handler_tasks())
        # What the kernels hold plus the cap, not what the handler would have sent.
        assert sum(sent) < 4 * 2**20
    finally:
        sock.close()


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(
    serve: Serve,
) -> None:
    sent = asyncio.Event()
    cancelled: list[float] = []

    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        exchange.send(b"x" * 4 * 2**20)  # below the cap, above what the kernels take
        sent.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.append(time.monotonic())

    server, port = await serve(handler, output_buffer_bytes=8 * 2**20, write_timeout_s=0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(GET)
        await sent.wait()
        started = time.monotonic()
        await eventually(lambda: bool(cancelled))
        assert cancelled[0] - started >= 0.25
        await eventually(lambda: server.connections == 0)
    finally:
        sock.close()


async def test_a_whole_response_to_a_client_that_never_reads_is_dropped_in_time(
    serve: Serve,
) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.respond(Response(HTTPStatus.OK, b"x" * 16 * 2**20))

    server, port = await serve(handler, write_timeout_s=0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(GET)
        await eventually(lambda: server.connections == 1)
        await eventually(lambda: server.connections == 0, within_s=2)
    finally:
        sock.close()


async def test_a_handler_error_is_logged_and_answered_500(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        raise RuntimeError("bug")

    _, port = await serve(handler)
    with capture_logs() as logged:
        assert (await request(port, "GET", "/"))[::2] == (500, b"internal server error\n")
    (failure,) = [entry for entry in logged if entry["event"] == "handler_failed"]
    assert failure["log_level"] == "error"
    assert isinstance(failure["exc_info"], RuntimeError)


async def test_a_handler_error_mid_stream_aborts_the_stream(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        exchange.send(b"partial\n")
        await asyncio.sleep(0)
        raise RuntimeError("bug")

    server, port = await serve(handler)
    with capture_logs() as logged:
        response = await exchange_bytes(port, GET)
    assert b"partial\n" in response
    assert not response.endswith(b"0\r\n\r\n")
    assert [entry["event"] for entry in logged].count("handler_failed") == 1
    await eventually(lambda: server.connections == 0)


async def test_a_handler_that_sends_nothing_is_answered_500(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        return

    _, port = await serve(handler)
    with capture_logs() as logged:
        assert (await request(port, "GET", "/"))[0] == 500
    assert "handler_sent_no_response" in [entry["event"] for entry in logged]


async def test_a_stream_left_open_by_the_handler_is_ended(serve: Serve) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        exchange.start_stream(HTTPStatus.OK, content_type="text/plain")
        exchange.send(b"only\n")

    _, port = await serve(handler)
    assert (await request(port, "GET", "/"))[::2] == (200, b"only\n")


def proxy_v2(source: str, port: int = 5555) -> bytes:
    address = ipaddress.ip_address(source)
    destination: IPAddress
    if isinstance(address, ipaddress.IPv4Address):
        family, destination = 0x11, ipaddress.IPv4Address("127.0.0.1")
    else:
        family, destination = 0x21, ipaddress.IPv6Address("::1")
    addresses = address.packed + destination.packed + struct.pack("!HH", port, 80)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(addresses)) + addresses


PROXY_V2_LOCAL = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
TRUSTED = (ipaddress.IPv4Network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 5555 80\r\n", "198.51.100.7"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 80\r\n", "2001:db8::7"),
        (proxy_v2("198.51.100.8"), "198.51.100.8"),
        (proxy_v2("2001:db8::8"), "2001:db8::8"),
    ],
)
async def test_a_trusted_proxy_names_the_client(serve: Serve, header: bytes, peer: str) -> None:
    _, port = await serve(proxy_protocol=True, trusted_proxies=TRUSTED)
    response = await exchange_bytes(port, header + b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.endswith(f"GET /p from {peer}: ".encode())


async def test_an_untrusted_proxy_is_dropped(serve: Serve) -> None:
    refusals: list[str] = []
    trusted = (ipaddress.IPv4Network("127.0.0.2/32"),)
    _, port = await serve(proxy_protocol=True, trusted_proxies=trusted, on_refused=refusals.append)
    header = b"PROXY TCP4 198.51.100.7 203.0.113.1 5555 80\r\n"
    assert await exchange_bytes(port, header + GET) == b""
    assert refusals == ["proxy"]


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 not-an-address\r\n"]
)
async def test_a_bad_proxy_header_is_dropped(serve: Serve, data: bytes) -> None:
    refusals: list[str] = []
    _, port = await serve(proxy_protocol=True, trusted_proxies=TRUSTED, on_refused=refusals.append)
    assert await exchange_bytes(port, data) == b""
    assert refusals == ["proxy"]


async def test_a_missing_proxy_header_is_dropped_in_time(serve: Serve) -> None:
    refusals: list[str] = []
    _, port = await serve(
        proxy_protocol=True,
        trusted_proxies=TRUSTED,
        proxy_timeout_s=0.3,
        on_refused=refusals.append,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_to_end(reader, within_s=2) == b""
    assert refusals == ["proxy"]
    writer.close()


@pytest.mark.parametrize("local", [b"PROXY UNKNOWN\r\n", PROXY_V2_LOCAL])
async def test_a_proxy_speaking_for_itself_is_closed(serve: Serve, local: bytes) -> None:
    server, port = await serve(proxy_protocol=True, trusted_proxies=TRUSTED)
    assert await exchange_bytes(port, local) == b""
    await eventually(lambda: server.connections == 0)


async def test_through_a_proxy_the_caps_count_the_real_source(serve: Serve) -> None:
    _, port = await serve(
        proxy_protocol=True,
        trusted_proxies=TRUSTED,
        max_connections_per_source=1,
        request_line_timeout_s=5,
    )

    async def slow_via_proxy(client: str) -> list[Connection]:
        header = f"PROXY TCP4 {client} 203.0.113.1 5555 80\r\n".encode()
        return await open_slow(port, ["127.0.0.1"], first=header + b"GET /sl")

    first = await slow_via_proxy("198.51.100.1")
    second = await slow_via_proxy("198.51.100.2")
    try:
        # One proxy address, two clients: neither takes the other's place.
        assert await still_open(first[0][0]) and await still_open(second[0][0])
        first += await slow_via_proxy("198.51.100.1")
        assert await read_to_end(first[0][0], within_s=1) == b""
        assert await still_open(first[1][0]) and await still_open(second[0][0])
    finally:
        close_all([*first, *second])


async def test_a_thousand_connect_and_close_leave_nothing_behind(serve: Serve) -> None:
    gate = Gate()
    server, port = await serve(gate)

    async def caller(kind: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if kind == 1:
            leave(writer, "reset")
            return
        if kind == 2:
            writer.write(b"GET /a-partial")
        elif kind == 3:
            writer.write(GET)
        elif kind == 4:
            writer.write(GET)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await read_until(reader, b"first\n")
        writer.close()

    await asyncio.gather(*(caller(n % 5) for n in range(1000)))
    await eventually(lambda: server.connections == 0 and not handler_tasks())
    assert gate.outcomes and set(gate.outcomes) == {"cancelled"}
    # The per-source counts of the admission fast path went back to nothing.
    assert not server._open_by_source


async def test_stop_drops_connections_quietly_and_cancels_handlers(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    server, port = await serve(gate, timeout_s=30.0)
    waiting = await asyncio.open_connection("127.0.0.1", port)
    waiting[1].write(b"GET /")
    streaming = await asyncio.open_connection("127.0.0.1", port)
    streaming[1].write(GET)
    await read_until(streaming[0], b"first\n")

    async with asyncio.timeout(5):
        await server.stop()
    for reader, writer in (waiting, streaming):
        await read_to_end(reader, within_s=5)
        writer.close()
    assert gate.outcomes == ["cancelled"]
    assert not handler_tasks()
    await eventually(lambda: server.connections == 0)
    assert not [record for record in caplog.records if record.levelno >= 30]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_stop_gives_running_handlers_their_grace(serve: Serve) -> None:
    gate = Gate()
    server, port = await serve(gate)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    await read_until(reader, b"first\n")
    asyncio.get_running_loop().call_later(0.1, gate.opened.set)
    await server.stop(grace_s=5)
    assert gate.outcomes == ["finished"]
    assert (await read_to_end(reader, within_s=5)).endswith(b"last\n\r\n0\r\n\r\n")
    writer.close()


async def test_start_twice_is_an_error(serve: Serve) -> None:
    server, _ = await serve()
    with pytest.raises(RuntimeError, match="already started"):
        await server.start("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout_s", 0),
        ("request_line_timeout_s", 0),
        ("write_timeout_s", -1),
        ("proxy_timeout_s", float("nan")),
        ("max_connections", 0),
        ("max_connections_per_source", 0),
        ("output_buffer_bytes", 0),
        ("max_body_bytes", -1),
    ],
)
def test_rejects_invalid_options(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{option} must be"):
        options: dict[str, Any] = {option: value}
        HTTPServer(hello, **options)


def test_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        HTTPServer(hello, proxy_protocol=True)
