"""A tiny HTTP/1.1 endpoint for operators: /metrics, /healthz and /readyz.

One request per connection. Everything a client sends is untrusted: the request head is bounded
in size and must arrive within a timeout, and the number of connections served at once is capped,
in all and per source address. A full endpoint drops its oldest connection still waiting for a
request head rather than refuse a newcomer, so idle or slowloris connections cannot keep a health
check out. Parsing and response rendering are pure; `OperatorHTTP` only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from relayprobe.metrics import Metrics

MAX_HEAD_BYTES = 8192

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TEXT = "text/plain; charset=utf-8"
_ALLOWED_METHODS = ("GET", "HEAD")
_ROUTES = ("/metrics", "/healthz", "/readyz")


class BadRequest(ValueError):
    """The request head is not a well-formed HTTP/1.x request head."""


class HeadTooLarge(BadRequest):
    """The request head is longer than MAX_HEAD_BYTES."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    version: str
    # Names lower-cased, values with surrounding whitespace removed, in the order received.
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def parse_request_head(data: bytes) -> Request:
    """Parse a request head: the request line and header fields, up to and including CRLF CRLF.

    Strict where leniency could hide a smuggling attempt: CRLF line ends only, no obsolete line
    folding, no whitespace before a field's colon, exactly one Host in HTTP/1.1.
    Raises HeadTooLarge or BadRequest (both ValueError).
    """
    if len(data) > MAX_HEAD_BYTES:
        raise HeadTooLarge(f"request head of {len(data)} bytes, limit {MAX_HEAD_BYTES}")
    if not data.endswith(b"\r\n\r\n"):
        raise BadRequest("request head does not end with an empty line")
    request_line, *field_lines = data[:-4].split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("malformed method")
    if not _ORIGIN_FORM.fullmatch(target):
        raise BadRequest("request target is not an absolute path")
    if not _VERSION.fullmatch(version):
        raise BadRequest("unsupported HTTP version")
    headers = tuple(_parse_field(line) for line in field_lines)
    hosts = sum(1 for name, _ in headers if name == "host")
    if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
        raise BadRequest("an HTTP/1.1 request needs exactly one Host field")
    return Request(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version.decode("ascii"),
        headers=headers,
    )


def _parse_field(line: bytes) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise BadRequest("malformed header field")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise BadRequest("control character in header field value")
    return name.decode("ascii").lower(), value.decode("latin-1")


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = _TEXT
    extra_headers: tuple[tuple[str, str], ...] = ()

    def render(self, *, head_only: bool, date: str) -> bytes:
        """The response as sent; `head_only` (HEAD) keeps the headers of the full response."""
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Date: {date}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status=status, body=text.encode())


_BAD_REQUEST = _text(HTTPStatus.BAD_REQUEST, "bad request")
_HEAD_TOO_LARGE = _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
_TIMEOUT = _text(HTTPStatus.REQUEST_TIMEOUT, "request timeout")
# Only sent when every slot is answering a complete request; a health checker must not read it
# as "not ready", and a retry a moment later gets in.
_BUSY = Response(
    status=HTTPStatus.SERVICE_UNAVAILABLE,
    body=b"busy: too many connections to this endpoint; this says nothing about readiness, retry",
    extra_headers=(("Retry-After", "1"),),
)


@dataclass(slots=True)
class _Connection:
    """A connection being served; mutable: `awaiting_head` ends, `evicted` begins."""

    writer: asyncio.StreamWriter
    source: str
    awaiting_head: bool = True
    evicted: bool = False

    @property
    def evictable(self) -> bool:
        return self.awaiting_head and not self.evicted


class OperatorHTTP:
    """Serves /metrics, /healthz and /readyz (GET and HEAD) on one listening address.

    `ready` says whether the service can do its job (listeners bound, sink up). A client gets
    `request_line_timeout_s` to send its request line and `timeout_s` for the whole head (else
    408), and `timeout_s` more to read the response. A newcomer beyond `max_connections` at once,
    or beyond `max_connections_per_source` from its address, takes the place of the oldest
    connection (of that address) still waiting for its head; with none to drop, it gets 503 busy.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        ready: Callable[[], bool],
        timeout_s: float = 5.0,
        request_line_timeout_s: float = 1.0,
        max_connections: int = 32,
        max_connections_per_source: int = 4,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        if request_line_timeout_s <= 0:
            raise ValueError(f"request_line_timeout_s must be > 0, not {request_line_timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        if max_connections_per_source < 1:
            raise ValueError(
                f"max_connections_per_source must be >= 1, not {max_connections_per_source}"
            )
        self._metrics = metrics
        self._ready = ready
        self._timeout_s = timeout_s
        self._request_line_timeout_s = request_line_timeout_s
        self._max_connections = max_connections
        self._max_connections_per_source = max_connections_per_source
        self._server: asyncio.Server | None = None
        # Each connection being served, by its handler's task, oldest first.
        self._connections: dict[asyncio.Task[Any], _Connection] = {}

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the address bound."""
        if self._server is not None:
            raise RuntimeError("already started")
        # Bounds each line of the head; _read_head() bounds their sum.
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=MAX_HEAD_BYTES - 4
        )
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return str(bound_host), int(bound_port)

    async def stop(self) -> None:
        """Stop listening and drop the connections being served."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        # Aborting (not cancelling) lets each handler end normally: Python 3.11 logs a cancelled
        # start_server handler as an error.
        for connection in self._connections.values():
            connection.writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    def respond(self, request: Request) -> Response:
        """The response to a well-formed request."""
        if request.path not in _ROUTES:
            return _text(HTTPStatus.NOT_FOUND, "not found")
        if request.method not in _ALLOWED_METHODS:
            return Response(
                status=HTTPStatus.METHOD_NOT_ALLOWED,
                body=b"method not allowed",
                extra_headers=(("Allow", ", ".join(_ALLOWED_METHODS)),),
            )
        if request.path == "/metrics":
            body, content_type = self._metrics.exposition()
            return Response(status=HTTPStatus.OK, body=body, content_type=content_type)
        if request.path == "/healthz":
            return _text(HTTPStatus.OK, "ok")
        if self._ready():
            return _text(HTTPStatus.OK, "ready")
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        connection = _Connection(writer=writer, source=str(peer[0]) if peer else "")
        if not self._make_room(connection.source):
            writer.write(_BUSY.render(head_only=False, date=formatdate(usegmt=True)))
            await self._close(writer)
            return
        task = asyncio.current_task()
        assert task is not None  # start_server runs each handler in a task of its own
        self._connections[task] = connection
        try:
            # A reset or a client too slow to read the response: nothing left to tell it.
            with contextlib.suppress(OSError, TimeoutError):
                await self._exchange(reader, connection)
        finally:
            del self._connections[task]
            await self._close(writer)

    def _make_room(self, source: str) -> bool:
        """Whether a newcomer from `source` may be served, evicting a connection if need be.

        The victim is the oldest connection still waiting for its head: of the same source when
        that source is at its cap, else of any. Connections answering a request are kept.
        """
        live = [c for c in self._connections.values() if not c.evicted]
        from_source = [c for c in live if c.source == source]
        if len(from_source) >= self._max_connections_per_source:
            candidates = from_source
        elif len(live) >= self._max_connections:
            candidates = live
        else:
            return True
        victim = next((c for c in candidates if c.evictable), None)
        if victim is None:
            return False
        # Its handler sees the end of the stream and ends quietly.
        victim.evicted = True
        victim.writer.transport.abort()
        return True

    async def _exchange(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        reply = await self._read_request(reader)
        connection.awaiting_head = False
        if reply is None or connection.evicted:
            return
        response, head_only = reply
        connection.writer.write(response.render(head_only=head_only, date=formatdate(usegmt=True)))
        async with asyncio.timeout(self._timeout_s):
            await connection.writer.drain()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """The request head, read line by line so the request line has a deadline of its own.

        Raises TimeoutError, HeadTooLarge, and the StreamReader's LimitOverrunError and
        IncompleteReadError.
        """
        async with asyncio.timeout(self._timeout_s):
            # A real client sends its request line at once; a slowloris must now come back often.
            async with asyncio.timeout(self._request_line_timeout_s):
                head = bytearray(await reader.readuntil(b"\r\n"))
            while not head.endswith(b"\r\n\r\n"):
                if len(head) > MAX_HEAD_BYTES:
                    raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
                head += await reader.readuntil(b"\r\n")
        return bytes(head)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response to send and whether it is to a HEAD; None if the client went away."""
        try:
            head = await self._read_head(reader)
        except TimeoutError:
            return _TIMEOUT, False
        except (asyncio.LimitOverrunError, HeadTooLarge):
            return _HEAD_TOO_LARGE, False
        except asyncio.IncompleteReadError:
            return None
        try:
            request = parse_request_head(head)
        except HeadTooLarge:
            return _HEAD_TOO_LARGE, False
        except BadRequest:
            return _BAD_REQUEST, False
        return self.respond(request), request.method == "HEAD"

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self._timeout_s):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            writer.transport.abort()
