"""An internet-facing HTTP/1.1 server that a front door plugs a handler into.

One request per connection (every response says `Connection: close`). The HTTP/1 parsing is
h11's; `ExchangeCodec` wraps it with this server's rules (origin-form targets, bounded heads and
bodies) as bytes in, bytes out, and `choose_victim` decides evictions: both pure. The asyncio
layer only moves bytes, keeps time and watches the client.

Every byte a client sends is untrusted: an optional PROXY header (from a trusted proxy only), the
request line and the whole request each have a deadline, the head and body are bounded, and the
connections served at once are capped, in all and per source; a newcomer beyond a cap takes the
place of the oldest connection still waiting for its request, or gets 503 busy. While a handler
runs, the socket is still read (a little) so that the client's FIN is seen: as on telnet, a FIN
alone is not a hang-up, but after it the kernel is asked whether what we wrote was acknowledged
or answered with a reset (a chunk's closing CRLF is held back until the next piece, so that
there is always something harmless to write); a client that is gone, or that stops reading,
ends the exchange and cancels the handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Generic, Protocol, TypeVar, cast
from urllib.parse import parse_qsl

import h11
import structlog

from relayprobe.frontdoors.addresses import IPAddress, IPNetwork, peer_address
from relayprobe.frontdoors.proxyproto import ProxyHeaderParser, read_proxy_header
from relayprobe.frontdoors.tcpstate import (
    LISTEN_BACKLOG,
    PeerState,
    limit_send_queue,
    peer_state,
)

log = structlog.get_logger("relayprobe.http")

MAX_HEAD_BYTES = 8192
MAX_QUERY_FIELDS = 32
TEXT_PLAIN = "text/plain; charset=utf-8"
# What is read and dropped after the request, so that the client's FIN is seen; then no more.
DISCARD_BYTES = 64 * 1024
# How long an error response waits for the client to stop sending before the socket is closed:
# closing with unread input sends a reset, which can destroy the response before it is read.
LINGER_S = 1.0
# Above this asyncio asks us to pause; a pause longer than write_timeout_s ends the exchange.
WRITE_HIGH_WATER = 64 * 1024
# What the kernel may hold for a client: small, so that output_buffer_bytes is what counts.
CLIENT_SEND_BUFFER = 64 * 1024
# After a FIN: the first check of the client, the next ones, and how long client_present()
# waits for the client to acknowledge what was written.
CLIENT_FIRST_CHECK = 0.01
CLIENT_CHECK_INTERVAL = 0.25
CLIENT_CHECK_TIMEOUT = 1.0
SLOW_CLIENT = "client stopped reading"
CLIENT_CLOSED = "client closed"


@dataclass(frozen=True, slots=True)
class Request:
    """A complete request. Everything in it came from the client: sanitise before display."""

    method: str
    target: str
    """Origin-form (starts with "/"), printable ASCII, as sent: not percent-decoded."""
    headers: tuple[tuple[str, str], ...]
    """Names lower-cased, values latin-1 decoded without surrounding whitespace, in order."""
    peer: IPAddress
    """The TCP peer, or the source in the PROXY header of a trusted proxy."""
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of the header field `name` (any case), None without one."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def header_list(self, name: str) -> str | None:
        """Every line of the list-valued field `name` joined in order with ", ", as RFC 9110
        (5.3) says they combine; None without one. For a field a proxy may append as a line of
        its own, where the first line can be the client's."""
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query's fields, percent-decoded (UTF-8, errors replaced); the last value of a name
        wins and only the first MAX_QUERY_FIELDS fields count."""
        fields = self.target.partition("?")[2].split("&", MAX_QUERY_FIELDS)[:MAX_QUERY_FIELDS]
        return dict(parse_qsl("&".join(fields), keep_blank_values=True))


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response. The server adds Date, Content-Length and Connection: close, and
    Cache-Control: no-store and X-Content-Type-Options: nosniff unless `headers` name them."""

    status: HTTPStatus
    body: bytes = b""
    content_type: str = TEXT_PLAIN
    headers: tuple[tuple[str, str], ...] = ()


def error_response(status: HTTPStatus) -> Response:
    """What the server itself answers to a request it refuses: the status, in one line."""
    return Response(status=status, body=f"{status.phrase.lower()}\n".encode())


BAD_REQUEST = error_response(HTTPStatus.BAD_REQUEST)
REQUEST_TIMEOUT = error_response(HTTPStatus.REQUEST_TIMEOUT)
HEAD_TOO_LARGE = error_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
BODY_TOO_LARGE = error_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
INTERNAL_ERROR = error_response(HTTPStatus.INTERNAL_SERVER_ERROR)
# Only sent when every slot is answering a request: a retry a moment later gets in, and a
# health checker's operator can tell it from the service's own answer.
BUSY = Response(
    status=HTTPStatus.SERVICE_UNAVAILABLE,
    body=b"busy: too many connections to this server (not an answer from the service), retry\n",
    headers=(("Retry-After", "1"),),
)


# Added to every response unless the handler names them: no caching of per-caller answers, and
# no browser guessing HTML in a text/plain transcript of hostile bytes.
_DEFAULT_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


def _response_head(
    status: HTTPStatus,
    content_type: str,
    headers: tuple[tuple[str, str], ...],
    *,
    content_length: int | None,
) -> h11.Response:
    """The head of a response: with Content-Length, else chunked (close-delimited for 1.0)."""
    framing = (
        ("Transfer-Encoding", "chunked")
        if content_length is None
        else ("Content-Length", str(content_length))
    )
    ours = [
        ("Date", formatdate(usegmt=True)),
        ("Content-Type", content_type),
        framing,
        ("Connection", "close"),
    ]
    named = {name.lower() for name, _ in headers}
    ours += [(name, value) for name, value in _DEFAULT_HEADERS if name.lower() not in named]
    return h11.Response(
        status_code=status, reason=HTTPStatus(status).phrase, headers=[*ours, *headers]
    )


def _whole_response(connection: h11.Connection, response: Response, *, head_only: bool) -> bytes:
    head = _response_head(
        response.status,
        response.content_type,
        response.headers,
        content_length=len(response.body),
    )
    data = connection.send(head)
    if response.body and not head_only:
        data += connection.send(h11.Data(data=response.body))
    return data + connection.send(h11.EndOfMessage())


def render_response(response: Response) -> bytes:
    """`response` as sent to a client whose request was not read (503 busy)."""
    return _whole_response(h11.Connection(h11.SERVER), response, head_only=False)


class ExchangeCodec:
    """One request and its response, as bytes in and bytes out, through h11; no I/O.

    Feed the client's bytes to `receive` until it returns the Request (or the error Response
    to send); then write what `respond`, or `start_stream`, `stream`... `end_stream`, return.
    Calling them out of order raises h11.LocalProtocolError.
    """

    def __init__(self, *, peer: IPAddress, max_body_bytes: int) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._peer = peer
        self._max_body_bytes = max_body_bytes
        self._fed = 0
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._head_only = False
        self._chunked = False
        self._held = b""
        self.request_line_received = False
        """Whether a line end has arrived: the request line is in (or known to be bad)."""

    @property
    def response_started(self) -> bool:
        return self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def response_complete(self) -> bool:
        return self._h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def receive(self, data: bytes) -> Request | Response | None:
        """Take bytes from the client: the request once complete, the response to refuse it
        with if the client erred, else None (more bytes needed)."""
        if b"\n" in data:
            self.request_line_received = True
        # In pieces, so that h11 never buffers much more than a head.
        for start in range(0, len(data), MAX_HEAD_BYTES):
            piece = data[start : start + MAX_HEAD_BYTES]
            self._fed += len(piece)
            self._h11.receive_data(piece)
            outcome = self._next_outcome()
            if outcome is not None:
                return outcome
        return None

    def _next_outcome(self) -> Request | Response | None:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return error_response(HTTPStatus(exc.error_status_hint))
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                refusal = self._check_head(event)
                if refusal is not None:
                    return refusal
                self._head = event
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body_bytes:
                    return BODY_TOO_LARGE
            elif isinstance(event, h11.EndOfMessage):
                return self._request()

    def _check_head(self, head: h11.Request) -> Response | None:
        """Why a head that h11 accepts is refused here, if it is."""
        self._head_only = head.method == b"HEAD"
        # h11 bounds an incomplete head; one that arrived whole in a piece is measured here.
        if self._fed - len(self._h11.trailing_data[0]) > MAX_HEAD_BYTES:
            return HEAD_TOO_LARGE
        if head.http_version not in (b"1.0", b"1.1"):
            return error_response(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
        if not head.target.startswith(b"/"):
            return BAD_REQUEST
        names = [name for name, _ in head.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            return BAD_REQUEST  # RFC 9112 6.3: a smuggling attempt more often than not
        length = next((value for name, value in head.headers if name == b"content-length"), None)
        if length is not None and int(length) > self._max_body_bytes:
            return BODY_TOO_LARGE
        return None

    def _request(self) -> Request:
        head = self._head
        assert head is not None  # EndOfMessage comes after a Request
        return Request(
            method=head.method.decode("ascii"),
            target=head.target.decode("ascii"),
            headers=tuple(
                (name.decode("ascii"), value.decode("latin-1")) for name, value in head.headers
            ),
            peer=self._peer,
            body=bytes(self._body),
        )

    def respond(self, response: Response) -> bytes:
        """The whole response (the head only, for a HEAD request)."""
        return _whole_response(self._h11, response, head_only=self._head_only)

    def start_stream(
        self, status: HTTPStatus, content_type: str, headers: tuple[tuple[str, str], ...]
    ) -> bytes:
        """The head of a response whose body comes piece by piece."""
        data = self._h11.send(_response_head(status, content_type, headers, content_length=None))
        self._chunked = not self._head_only and self._h11.their_http_version == b"1.1"
        return data

    def stream(self, data: bytes) -> bytes:
        """A piece of the body, except (chunked) the CRLF that ends its chunk: that is held
        back for `probe`, the next piece or the end, so that there is always something
        harmless to write when the client must be made to answer."""
        if self._head_only or not data:
            return b""
        chunk = self.probe() + self._h11.send(h11.Data(data=data))
        if self._chunked:
            chunk, self._held = chunk[:-2], chunk[-2:]
        return chunk

    def probe(self) -> bytes:
        """Bytes that change nothing for the client (b"" if there are none)."""
        held, self._held = self._held, b""
        return held

    def end_stream(self) -> bytes:
        return self.probe() + self._h11.send(h11.EndOfMessage())


class Slot(Protocol):
    """A connection as admission sees it."""

    @property
    def source(self) -> IPAddress | None: ...

    @property
    def evictable(self) -> bool: ...


_S = TypeVar("_S", bound=Slot)


@dataclass(frozen=True, slots=True)
class Room(Generic[_S]):
    """Whether a newcomer may be served, and the connection to drop for it, if any."""

    admitted: bool
    victim: _S | None = None


def choose_victim(
    others: Sequence[_S],
    source: IPAddress | None,
    *,
    max_connections: int,
    max_per_source: int,
) -> Room[_S]:
    """Make room for a newcomer from `source` (None: not known yet) among `others`, the
    connections being served, oldest first.

    The victim is the oldest connection still waiting for its request: of the same source when
    that source is at its cap, else of any. Connections answering a request are kept.
    """
    from_source = [slot for slot in others if source is not None and slot.source == source]
    if len(from_source) >= max_per_source:
        candidates: Sequence[_S] = from_source
    elif len(others) >= max_connections:
        candidates = others
    else:
        return Room(admitted=True)
    victim = next((slot for slot in candidates if slot.evictable), None)
    return Room(admitted=victim is not None, victim=victim)


class _Phase(enum.Enum):
    NEW = enum.auto()
    """Accepted, not yet admitted."""
    PROXY = enum.auto()
    """Waiting for the PROXY header."""
    REQUEST = enum.auto()
    """Waiting for the request head and body."""
    HANDLING = enum.auto()
    """The handler runs."""
    CLOSING = enum.auto()
    """The response is complete; the transport flushes it, then closes."""
    LINGERING = enum.auto()
    """An error response is out; what the client still sends is read and dropped."""
    ENDED = enum.auto()


_WAITING = frozenset({_Phase.PROXY, _Phase.REQUEST})
_SERVING = _WAITING | {_Phase.HANDLING, _Phase.CLOSING}


@dataclass(frozen=True, slots=True)
class _Options:
    timeout_s: float
    request_line_timeout_s: float
    max_connections: int
    max_connections_per_source: int
    max_body_bytes: int
    output_buffer_bytes: int
    write_timeout_s: float
    proxy_protocol: bool
    trusted_proxies: tuple[IPNetwork, ...]
    proxy_timeout_s: float

    def __post_init__(self) -> None:
        for name in ("timeout_s", "request_line_timeout_s", "write_timeout_s", "proxy_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("max_connections", "max_connections_per_source", "output_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, not {self.max_body_bytes}")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies: no one else may send one")


class Exchange:
    """What a handler gets besides the Request: how to answer, and whether the client is there.

    Answer with `respond`, or with `start_stream`, any number of `send` and `end_stream`. When
    the client is gone or stops reading, the exchange ends: what is sent is dropped and the
    handler task is cancelled.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def respond(self, response: Response) -> None:
        """Send a whole response (Content-Length); a HEAD request gets the head only."""
        self._connection.respond(response)

    def start_stream(
        self,
        status: HTTPStatus,
        *,
        content_type: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Send the head of a response whose body follows in pieces (chunked)."""
        self._connection.start_stream(status, content_type, headers)

    def send(self, data: bytes) -> None:
        """Send a piece of the body at once; synchronous, to be called from event callbacks."""
        self._connection.send(data)

    async def end_stream(self) -> None:
        """End the body; returns once it has gone out (or the client was dropped: see `gone`)."""
        await self._connection.end_stream()

    async def client_present(self) -> None:
        """Return at once, unless the client has half-closed: then wait (at most
        CLIENT_CHECK_TIMEOUT) until it has acknowledged what was sent. Raises
        asyncio.CancelledError if the client is gone."""
        await self._connection.client_present()

    @property
    def gone(self) -> bool:
        """Whether the client went away, or was cut off, before it had the whole response."""
        return self._connection.gone


Handler = Callable[[Request, Exchange], Awaitable[None]]


class _Connection(asyncio.Protocol):
    """One client: (a PROXY header,) one request, the handler's response, close."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.options = server.options
        self.transport: asyncio.Transport | None = None
        self.phase = _Phase.NEW
        self.source: IPAddress | None = None
        self.proxy: ProxyHeaderParser | None = None
        self.codec: ExchangeCodec | None = None
        self.task: asyncio.Task[None] | None = None
        self.request_started = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        """Ends the current phase: PROXY header, request, flush, linger."""
        self.stall: asyncio.TimerHandle | None = None
        """Ends the exchange when writing has been paused for write_timeout_s."""
        self.watch: asyncio.TimerHandle | None = None
        # Once: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self.discard_budget = DISCARD_BYTES
        self.client_silent = False
        """The client sent FIN, or we stopped reading: only writes can tell us it has gone."""
        self.written_since_check = False
        self.gone = False
        self.unsent: list[bytes] = []
        """Pieces sent in this turn of the event loop: they go out as one chunk at its end."""
        self.log = log

    @property
    def counted(self) -> bool:
        return self.phase in _SERVING

    @property
    def evictable(self) -> bool:
        return self.phase in _WAITING

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server._open[self] = None
        peername = transport.get_extra_info("peername")
        if peername is None:  # reset before we saw it
            self.end()
            return
        options = self.options
        self.transport.set_write_buffer_limits(
            high=min(WRITE_HIGH_WATER, options.output_buffer_bytes)
        )
        limit_send_queue(
            transport.get_extra_info("socket"),
            buffer_bytes=CLIENT_SEND_BUFFER,
            stalled_after=options.write_timeout_s,
        )
        peer = peer_address(peername[0])
        self.log = log.bind(peer=str(peer))
        if not options.proxy_protocol:
            self._admit(peer)
        elif not any(peer in network for network in options.trusted_proxies):
            self._drop("untrusted proxy")
        elif self.server._make_room(self, None):
            self.phase = _Phase.PROXY
            self.proxy = ProxyHeaderParser()
            self._set_deadline(
                options.proxy_timeout_s, functools.partial(self._drop, "no PROXY header in time")
            )
        else:
            self._refuse_busy()

    def data_received(self, data: bytes) -> None:
        if self.phase is _Phase.PROXY:
            data = self._read_proxy_header(data)
            if not data:
                return
        if self.phase is _Phase.REQUEST:
            self._read_request(data)
        elif self.phase is not _Phase.ENDED:
            self._discard(len(data))

    def eof_received(self) -> bool:
        if self.phase is _Phase.HANDLING:
            self.log.debug("client_half_closed")
            self._watch_client()
            return True  # keep writing: a half-closed client may still read
        if self.phase in _WAITING:
            self.phase = _Phase.ENDED  # gone before its request: nothing to answer
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = _Phase.ENDED
        for timer in (self.deadline, self.stall, self.watch):
            if timer is not None:
                timer.cancel()
        del self.server._open[self]
        if self.source is not None:
            by_source = self.server._open_by_source
            by_source[self.source] -= 1
            if not by_source[self.source]:
                del by_source[self.source]
        if not self.closed.done():
            self.closed.set_result(None)
        if self.codec is not None and not self.codec.response_complete:
            self.gone = True
            if self.task is not None:
                self.task.cancel()

    def pause_writing(self) -> None:
        self.stall = self.loop.call_later(self.options.write_timeout_s, self._abort, SLOW_CLIENT)

    def resume_writing(self) -> None:
        if self.stall is not None:
            self.stall.cancel()

    # Before the request

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY parser; admit the client once the header is in; the bytes after it."""
        assert self.proxy is not None
        read = read_proxy_header(self.proxy, data)
        if not read.complete:
            return b""
        self.proxy = None
        if read.error is not None:
            self._drop(f"bad PROXY header: {read.error}")
        elif read.source is None:
            self.log.debug("proxy_local_connection")
            self.end()
        else:
            self.log = self.log.bind(client=str(read.source))
            self._admit(read.source)
            return read.rest
        return b""

    def _admit(self, source: IPAddress) -> None:
        if not self.server._make_room(self, source):
            self._refuse_busy()
            return
        self.source = source
        self.server._open_by_source[source] += 1
        self.phase = _Phase.REQUEST
        self.codec = ExchangeCodec(peer=source, max_body_bytes=self.options.max_body_bytes)
        self.request_started = self._now()
        # A real client sends its request line at once; a slowloris must now come back often.
        first = min(self.options.request_line_timeout_s, self.options.timeout_s)
        self._set_deadline(first, functools.partial(self._refuse, REQUEST_TIMEOUT))

    def _read_request(self, data: bytes) -> None:
        assert self.codec is not None
        outcome = self.codec.receive(data)
        if outcome is None:
            if self.codec.request_line_received:
                left = self.request_started + self.options.timeout_s - self._now()
                self._set_deadline(left, functools.partial(self._refuse, REQUEST_TIMEOUT))
        elif isinstance(outcome, Response):
            self._refuse(outcome)
        else:
            self._start_handler(outcome)

    def _refuse(self, response: Response) -> None:
        assert self.codec is not None
        self._linger(self.codec.respond(response))

    def _refuse_busy(self) -> None:
        self.server._refused("busy")
        self._linger(render_response(BUSY))

    def _linger(self, data: bytes) -> None:
        """Send an error response and FIN; read what the client still sends, then close."""
        assert self.transport is not None
        self.phase = _Phase.LINGERING
        self.codec = None  # what h11 buffered
        self._write(data)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._set_deadline(LINGER_S, self.end)

    def _drop(self, why: str) -> None:
        """Close a connection whose PROXY header can't be believed."""
        self.log.warning("proxy_refused", why=why)
        self.server._refused("proxy")
        self.end()

    def _discard(self, size: int) -> None:
        self.discard_budget -= size
        if self.discard_budget >= 0:
            return
        assert self.transport is not None
        self.transport.pause_reading()
        if self.phase is _Phase.HANDLING:
            self._watch_client()

    def evict(self) -> None:
        self.log.debug("evicted")
        self.end()

    def end(self) -> None:
        """Drop the connection now."""
        self.phase = _Phase.ENDED
        if self.transport is not None:
            self.transport.abort()

    # The handler

    def _start_handler(self, request: Request) -> None:
        self.phase = _Phase.HANDLING
        self._cancel_deadline()
        self.task = self.loop.create_task(self._run_handler(request))
        self.server._tasks.add(self.task)
        # Cleaned up from its done-callback: a task cancelled before its first step runs no
        # `finally`.
        self.task.add_done_callback(self._handler_done)

    async def _run_handler(self, request: Request) -> None:
        await self.server.handler(request, Exchange(self))

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self.server._tasks.discard(task)
        if task.cancelled():
            if self.phase is _Phase.HANDLING:
                self._abort("handler cancelled")
            return
        error = task.exception()
        if error is not None:
            self.log.error("handler_failed", exc_info=error)
        if self.phase is not _Phase.HANDLING:
            return
        assert self.codec is not None
        if not self.codec.response_started:
            if error is None:
                self.log.error("handler_sent_no_response")
            self.respond(INTERNAL_ERROR)
        elif error is not None:
            self._abort("handler failed")
        else:
            self._finish(self._end_body())

    # The response (through Exchange)

    def respond(self, response: Response) -> None:
        if self.phase is _Phase.ENDED:
            return
        assert self.codec is not None
        self._finish(self.codec.respond(response))

    def start_stream(
        self, status: HTTPStatus, content_type: str, headers: tuple[tuple[str, str], ...]
    ) -> None:
        if self.phase is _Phase.ENDED:
            return
        assert self.codec is not None
        self._write(self.codec.start_stream(status, content_type, headers))

    def send(self, data: bytes) -> None:
        if self.phase is not _Phase.HANDLING or not data:
            return
        # The events of one loop turn (a reply's lines, say) go out in one chunk and one write.
        if not self.unsent:
            self.loop.call_soon(self._send_unsent)
        self.unsent.append(data)

    def _send_unsent(self) -> None:
        unsent, self.unsent = self.unsent, []
        if self.phase is not _Phase.HANDLING or not unsent:
            return
        assert self.codec is not None and self.transport is not None
        self._write(self.codec.stream(b"".join(unsent)))
        if self.transport.get_write_buffer_size() > self.options.output_buffer_bytes:
            self._abort(SLOW_CLIENT)

    def _end_body(self) -> bytes:
        """What ends the response: the pieces not yet sent, then the end of the body."""
        self._send_unsent()
        assert self.codec is not None
        return self.codec.end_stream()

    async def end_stream(self) -> None:
        if self.phase is _Phase.HANDLING:
            self._finish(self._end_body())
        # The flush is bounded by the CLOSING deadline too.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.write_timeout_s):
                await self.closed

    def _finish(self, data: bytes) -> None:
        """Write the end of the response and close once it is out (within write_timeout_s)."""
        assert self.transport is not None
        self._write(data)
        self.phase = _Phase.CLOSING
        if self.watch is not None:
            self.watch.cancel()
        self.transport.close()
        self._set_deadline(
            self.options.write_timeout_s, functools.partial(self._abort, SLOW_CLIENT)
        )

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self.written_since_check = True

    def _abort(self, reason: str) -> None:
        """The client is gone or too slow: drop it; connection_lost cancels the handler."""
        if self.phase is _Phase.ENDED:
            return
        self.log.debug("client_dropped", reason=reason)
        if reason == SLOW_CLIENT:
            self.server._refused("slow_client")
        self.gone = True
        self.end()

    # Is the client still there?

    def _watch_client(self) -> None:
        """Check, now and every CLIENT_CHECK_INTERVAL, that the silent client is still there.

        The first check writes what it can, for a client who hung up to answer with a reset;
        the second, CLIENT_FIRST_CHECK later, sees it.
        """
        if self.client_silent:
            return
        self.client_silent = True
        self.written_since_check = False
        self._check_client(next_in=CLIENT_FIRST_CHECK)

    def _check_client(self, next_in: float = CLIENT_CHECK_INTERVAL) -> None:
        if self.phase is not _Phase.HANDLING:
            return
        self._verify_client()
        self.watch = self.loop.call_later(next_in, self._check_client)

    def _verify_client(self) -> None:
        """End the exchange if the kernel says the client is gone; else make sure something
        went out since the last check, for a gone client to answer with a reset."""
        assert self.transport is not None and self.codec is not None
        if peer_state(self.transport.get_extra_info("socket")) is PeerState.GONE:
            self._abort(CLIENT_CLOSED)
            return
        self._send_unsent()
        if not self.written_since_check:
            self._write(self.codec.probe())
        self.written_since_check = False

    async def client_present(self) -> None:
        if self.gone:
            raise asyncio.CancelledError
        if self.phase is not _Phase.HANDLING or not self.client_silent:
            return
        self._verify_client()
        delay = 0.001
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLIENT_CHECK_TIMEOUT):
                while not self._acknowledged():
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, CLIENT_CHECK_INTERVAL)

    def _acknowledged(self) -> bool:
        """Whether the client has acknowledged all we wrote; raises CancelledError if gone."""
        assert self.transport is not None
        state = peer_state(self.transport.get_extra_info("socket"))
        if state is PeerState.GONE or self.phase is _Phase.ENDED:
            self._abort(CLIENT_CLOSED)
            raise asyncio.CancelledError
        return state is PeerState.UNKNOWN or (
            state is PeerState.PRESENT and not self.transport.get_write_buffer_size()
        )

    # Timers

    def _set_deadline(self, delay: float, action: Callable[[], None]) -> None:
        self._cancel_deadline()
        self.deadline = self.loop.call_later(delay, action)

    def _now(self) -> float:
        return self.loop.time()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


class HTTPServer:
    """Serves each connection's one request with `handler` on one listening address.

    A client gets `request_line_timeout_s` to send its request line and `timeout_s` for the
    whole request (else 408), with a head of at most MAX_HEAD_BYTES (else 431) and a body of at
    most `max_body_bytes` (else 413). A newcomer beyond `max_connections` at once, or beyond
    `max_connections_per_source` from its address, takes the place of the oldest connection (of
    that address) still waiting for its request; with none to drop, it gets 503 busy. A client
    that leaves more than `output_buffer_bytes` unread, or reads nothing for `write_timeout_s`,
    is dropped. With `proxy_protocol`, only `trusted_proxies` may connect, each connection
    starting with a PROXY header (v1 or v2) within `proxy_timeout_s`, whose source is the
    client. `on_refused` is told of each refusal: "busy", "proxy" or "slow_client".
    """

    def __init__(
        self,
        handler: Handler,
        *,
        timeout_s: float = 5.0,
        request_line_timeout_s: float = 1.0,
        max_connections: int = 32,
        max_connections_per_source: int = 4,
        max_body_bytes: int = 0,
        output_buffer_bytes: int = 256 * 1024,
        write_timeout_s: float = 30.0,
        proxy_protocol: bool = False,
        trusted_proxies: Sequence[IPNetwork] = (),
        proxy_timeout_s: float = 5.0,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.options = _Options(
            timeout_s=timeout_s,
            request_line_timeout_s=request_line_timeout_s,
            max_connections=max_connections,
            max_connections_per_source=max_connections_per_source,
            max_body_bytes=max_body_bytes,
            output_buffer_bytes=output_buffer_bytes,
            write_timeout_s=write_timeout_s,
            proxy_protocol=proxy_protocol,
            trusted_proxies=tuple(trusted_proxies),
            proxy_timeout_s=proxy_timeout_s,
        )
        self.handler = handler
        self._on_refused = on_refused
        self._server: asyncio.Server | None = None
        # Every open connection, oldest first; and the handlers running.
        self._open: dict[_Connection, None] = {}
        # Open connections by the source they speak for, once it is known.
        self._open_by_source: collections.Counter[IPAddress] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """The connections open now, whatever their state."""
        return len(self._open)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the address bound."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), host, port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return str(bound_host), int(bound_port)

    async def stop(self, *, grace_s: float = 0) -> None:
        """Stop listening; give running handlers `grace_s` to finish, then drop every
        connection and cancel the handlers left."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for connection in list(self._open):
            if connection.phase is not _Phase.HANDLING:
                connection.end()
        if grace_s > 0 and self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for connection in list(self._open):
            connection.end()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def _make_room(self, newcomer: _Connection, source: IPAddress | None) -> bool:
        if self._below_caps(source):
            return True
        others = [c for c in self._open if c is not newcomer and c.counted]
        room = choose_victim(
            others,
            source,
            max_connections=self.options.max_connections,
            max_per_source=self.options.max_connections_per_source,
        )
        if room.victim is not None:
            room.victim.evict()
        return room.admitted

    def _below_caps(self, source: IPAddress | None) -> bool:
        """Whether a newcomer is under both caps counting every open connection, an upper
        bound of those `choose_victim` counts: then there is room without looking closer, and
        admission costs the same with 10 connections as with 10,000."""
        options = self.options
        if len(self._open) - 1 >= options.max_connections:
            return False
        if source is None:
            return True
        return self._open_by_source[source] < options.max_connections_per_source

    def _refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
