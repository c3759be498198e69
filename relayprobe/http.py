"""A tiny HTTP/1.1 endpoint for operators: /metrics, /healthz and /readyz.

One request per connection. Everything a client sends is untrusted: the request head is bounded
in size and must arrive within a timeout, and the number of connections served at once is capped.
Parsing and response rendering are pure; `OperatorHTTP` only moves bytes.
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
_BUSY = _text(HTTPStatus.SERVICE_UNAVAILABLE, "busy")


class OperatorHTTP:
    """Serves /metrics, /healthz and /readyz (GET and HEAD) on one listening address.

    `ready` says whether the service can do its job (listeners bound, sink up). A client gets
    `timeout_s` to send its request head (else 408), and `timeout_s` more to read the response.
    Beyond `max_connections` at once, new connections get 503 at once.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        ready: Callable[[], bool],
        timeout_s: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self._metrics = metrics
        self._ready = ready
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        # Each connection being served: its handler's task, and its writer to drop it on stop().
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the address bound."""
        if self._server is not None:
            raise RuntimeError("already started")
        # readuntil() keeps the separator beyond the limit, so a whole head is <= MAX_HEAD_BYTES.
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
        for writer in self._connections.values():
            writer.transport.abort()
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
        if len(self._connections) >= self._max_connections:
            writer.write(_BUSY.render(head_only=False, date=formatdate(usegmt=True)))
            await self._close(writer)
            return
        task = asyncio.current_task()
        assert task is not None  # start_server runs each handler in a task of its own
        self._connections[task] = writer
        try:
            # A reset or a client too slow to read the response: nothing left to tell it.
            with contextlib.suppress(OSError, TimeoutError):
                await self._exchange(reader, writer)
        finally:
            del self._connections[task]
            await self._close(writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = await self._read_request(reader)
        if reply is None:
            return
        response, head_only = reply
        writer.write(response.render(head_only=head_only, date=formatdate(usegmt=True)))
        async with asyncio.timeout(self._timeout_s):
            await writer.drain()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response to send and whether it is to a HEAD; None if the client went away."""
        try:
            async with asyncio.timeout(self._timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return _TIMEOUT, False
        except asyncio.LimitOverrunError:
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
