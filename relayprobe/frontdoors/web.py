"""The public web front door: `curl relay-test.isp.example` and a browser page, on the session core.

`GET /` from curl streams the caller's test as the telnet transcript (text/plain, chunked,
flushed line by line) or as NDJSON; a browser gets a page whose button starts the test with a
same-origin `POST /test`; `/results/<id>` shows a stored result. Admission, rate limits and
history are the core's, shared with the telnet door. `webrouting` decides; this module moves bytes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import structlog

from relayprobe.frontdoors.access import Refusal
from relayprobe.frontdoors.addresses import IPAddress
from relayprobe.frontdoors.core import EndReason, RunningTest, SessionCore, Ticket
from relayprobe.frontdoors.httpserver import Exchange, HTTPServer, Request, Response
from relayprobe.frontdoors.telnet import SHUTDOWN_MESSAGE
from relayprobe.frontdoors.webrouting import NDJSON, Action, Format, Route, forwarded_caller, route
from relayprobe.operations.config import Endpoint
from relayprobe.operations.startup import StartupError, bind_advice
from relayprobe.relaytest.events import Event, ServiceMessage
from relayprobe.reports.render import ndjson_records
from relayprobe.reports.result import TestResult
from relayprobe.reports.webpages import (
    content_security_policy,
    landing_page,
    new_nonce,
    result_page,
)
from relayprobe.storage.history import (
    HistoryUnavailableError,
    error_line,
    history_errors,
    is_unavailable,
)
from relayprobe.storage.historywriter import HistoryWriter
from relayprobe.storage.schema import HistoryBackend

log = structlog.get_logger("relayprobe.frontdoors.web")

ResultLookup = Callable[[str], Awaitable[dict[str, Any] | None]]

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
# A test streams for as long as it runs: tell a reverse proxy in front not to buffer it.
_STREAM_HEADERS = (*_SECURITY_HEADERS, ("X-Accel-Buffering", "no"))
_REFUSAL_STATUS = {
    "access": HTTPStatus.FORBIDDEN,
    "busy": HTTPStatus.SERVICE_UNAVAILABLE,
}
CROSS_SITE_MESSAGE = (
    "A request from another site does not start a test; open this address yourself, or use "
    "curl on your mail server"
)
# A Host header worth repeating on the page: a host name or address, and a port.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?")
# Each page view looks a result up in the history on a thread, with a connection of its own: a
# few at once is plenty.
MAX_LOOKUPS = 4
# A history that could not be read is worth asking again soon: a database restarts in seconds.
HISTORY_RETRY_AFTER_S = 60


def refusal_response(refusal: Refusal) -> Response:
    """403 for the access lists, 429 for a rate limit, 503 when busy; one line of text."""
    status = _REFUSAL_STATUS.get(refusal.reason, HTTPStatus.TOO_MANY_REQUESTS)
    headers: tuple[tuple[str, str], ...] = _SECURITY_HEADERS
    if refusal.retry_after_s is not None:
        headers = (*headers, ("Retry-After", str(refusal.retry_after_s)))
    return Response(status, f"{refusal.message}\n".encode(), TEXT, headers)


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status, f"{text}\n".encode(), TEXT, _SECURITY_HEADERS)


def _json_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class StoredResults:
    """Shareable results, read from the history (and from its writer's queue, so that a link
    works as soon as it is shown): none past the retention, a few reads at once.

    Each lookup opens the history with `open_backend` and reads it on a thread: the backends'
    one sync implementation serves the writer, `relayprobe history` and this door, and a page
    view is rare enough for a connection of its own. A lookup that fails because the database
    is unavailable, or takes over `timeout_s`, raises HistoryUnavailableError; its thread keeps
    its slot until it ends (each backend call is bounded), so a hung database holds at most
    MAX_LOOKUPS threads.
    """

    def __init__(
        self,
        open_backend: Callable[[], HistoryBackend],
        *,
        retention_days: float,
        writer: HistoryWriter,
        timeout_s: float = 15.0,
    ) -> None:
        self.open_backend = open_backend
        self.retention_days = retention_days
        self.writer = writer
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(MAX_LOOKUPS)

    async def find(self, result_id: str) -> dict[str, Any] | None:
        if (unsaved := self.writer.unsaved(result_id)) is not None:
            return unsaved.to_json()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
                lookup = asyncio.ensure_future(asyncio.to_thread(self._find, result_id))
                lookup.add_done_callback(self._lookup_done)
                return await asyncio.shield(lookup)
        except TimeoutError:
            reason = f"no answer in {self.timeout_s:g} s"
        except history_errors() as exc:
            if not is_unavailable(exc):
                raise
            reason = error_line(exc)
        log.warning("history.lookup_failed", error=reason)
        raise HistoryUnavailableError(f"the history is unavailable: {reason}")

    def _lookup_done(self, lookup: asyncio.Future[dict[str, Any] | None]) -> None:
        self._slots.release()
        if not lookup.cancelled():
            lookup.exception()  # retrieved: the caller may have stopped waiting for it

    def _find(self, result_id: str) -> dict[str, Any] | None:
        with self.open_backend() as backend:
            entry = backend.by_public_id(
                result_id,
                now=datetime.datetime.now(datetime.UTC),
                retention_days=self.retention_days,
            )
        return None if entry is None else entry.result


class WebFrontDoor:
    """Listeners of the public web front door; each request is one `handle` call."""

    def __init__(self, core: SessionCore, *, results: ResultLookup | None = None) -> None:
        self.core = core
        self.results = results
        self.servers: list[HTTPServer] = []

    async def start(self, endpoints: tuple[Endpoint, ...]) -> list[Endpoint]:
        settings = self.core.settings
        bound: list[Endpoint] = []
        for endpoint in endpoints:
            server = HTTPServer(
                self.handle,
                # A test holds its connection while it runs: room for every session, and more.
                max_connections=settings.max_sessions + 64,
                proxy_protocol=settings.proxy_protocol,
                trusted_proxies=self.core.trusted_proxies,
                proxy_timeout_s=settings.proxy_timeout,
                output_buffer_bytes=settings.caller_output_bytes,
                write_timeout_s=settings.caller_write_timeout,
                max_body_bytes=1024,
                on_refused=self.core.metrics.refused,
            )
            try:
                host, port = await server.start(endpoint.host, endpoint.port)
            except OSError as exc:
                await self.stop()
                advice = bind_advice(endpoint, exc, option="--web-listen")
                raise StartupError(exc.errno, f"web front door: {advice}") from None
            self.servers.append(server)
            bound.append(Endpoint(host, port))
        return bound

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        self.servers.clear()

    async def handle(self, request: Request, exchange: Exchange) -> None:
        caller = forwarded_caller(
            request.peer, request.header_list("x-forwarded-for"), self.core.trusted_proxies
        )
        if caller is None:
            exchange.respond(_text(HTTPStatus.BAD_REQUEST, "unreadable X-Forwarded-For"))
            return
        chosen = route(
            method=request.method,
            path=request.path,
            accept=request.header("accept"),
            query_format=request.query.get("format"),
            sec_fetch_site=request.header("sec-fetch-site"),
            origin=request.header("origin"),
            host=request.header("host"),
        )
        match chosen.action:
            case Action.RUN_TEST if chosen.head_only:
                exchange.respond(Response(HTTPStatus.OK, b"", _content_type(chosen.format)))
            case Action.RUN_TEST:
                await self._run_test(caller, chosen.format, exchange)
            case Action.LANDING_PAGE:
                exchange.respond(await self._landing_page(caller, request))
            case Action.RESULT_PAGE | Action.RESULT_JSON:
                exchange.respond(await self._stored_result(chosen))
            case Action.CROSS_SITE:
                exchange.respond(_text(HTTPStatus.FORBIDDEN, CROSS_SITE_MESSAGE))
            case Action.METHOD_NOT_ALLOWED:
                response = _text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
                exchange.respond(
                    Response(
                        response.status,
                        response.body,
                        TEXT,
                        (*response.headers, ("Allow", chosen.allow)),
                    )
                )
            case Action.NOT_FOUND:
                exchange.respond(_text(HTTPStatus.NOT_FOUND, "not found"))

    async def _run_test(self, caller: IPAddress, chosen: Format, exchange: Exchange) -> None:
        core = self.core
        ticket = await core.admit(caller, door="http", session_id=core.next_session_id())
        if not isinstance(ticket, Ticket):
            exchange.respond(refusal_response(ticket))
            return
        as_ndjson = chosen is Format.NDJSON
        exchange.start_stream(
            HTTPStatus.OK, content_type=NDJSON if as_ndjson else TEXT, headers=_STREAM_HEADERS
        )

        def send(event: Event, lines: tuple[str, ...]) -> None:
            if as_ndjson:
                exchange.send(b"".join(_json_line(r) for r in ndjson_records(event, lines)))
            elif lines:
                exchange.send("".join(f"{line}\n" for line in lines).encode())

        running = core.start(ticket, on_lines=send, checkpoint=exchange.client_present)
        result = await self._outcome(running)
        if result is None:
            line = (
                SHUTDOWN_MESSAGE
                if running.end_reason is EndReason.SHUTDOWN
                else ":Internal error; the test was stopped"
            )
            send(ServiceMessage((line,)), (line,))
        elif as_ndjson:
            url = None if result.result_id is None else core.result_url(result.result_id)
            exchange.send(
                _json_line({"type": "result", "result": {**result.to_json(), "url": url}})
            )
        await exchange.end_stream()

    async def _outcome(self, running: RunningTest) -> TestResult | None:
        """The test's result; None when the service stopped it or it failed (logged by the core).

        The test runs in a task of its own, shielded: when the client hangs up, this handler is
        cancelled and stops the test with that reason, rather than leave it a bare cancel.
        """
        assert running.task is not None
        try:
            return await asyncio.shield(running.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                running.stop(EndReason.CLIENT_CLOSED)
                raise
            return None
        except Exception:
            return None

    async def _landing_page(self, caller: IPAddress, request: Request) -> Response:
        refusal = await self.core.admission(caller)
        admission = "You can test this address now." if refusal is None else refusal.message
        nonce = new_nonce()
        host, commands = self._commands(request)
        body = landing_page(
            caller=str(caller),
            admission=admission,
            commands=commands,
            service_name=host,
            nonce=nonce,
        )
        csp = ("Content-Security-Policy", content_security_policy(nonce))
        return Response(HTTPStatus.OK, body, HTML, (*_SECURITY_HEADERS, csp))

    def _commands(self, request: Request) -> tuple[str, list[str]]:
        """The service's host name and what to type on the mail server: from the public URL
        when set, else from the Host the browser used, when it is a plain host or address."""
        public_url = self.core.settings.public_url
        if public_url is not None:
            host = urllib.parse.urlsplit(public_url).hostname or public_url
            return host, [f"telnet {host}", f"curl -N {public_url}/"]
        match = _AUTHORITY.fullmatch(request.header("host") or "")
        if match is None:
            host, base = "relayprobe", "http://<this service>"
        else:
            host, base = match.group(1), f"http://{match.group(0)}"
        return host, [f"telnet {host}", f"curl -N {base}/"]

    async def _stored_result(self, chosen: Route) -> Response:
        assert chosen.result_id is not None
        try:
            found = None if self.results is None else await self.results(chosen.result_id)
        except HistoryUnavailableError:
            return Response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                b"The result history is unavailable for now, try again in a minute\n",
                TEXT,
                (*_SECURITY_HEADERS, ("Retry-After", str(HISTORY_RETRY_AFTER_S))),
            )
        if found is None:
            return _text(HTTPStatus.NOT_FOUND, "not found")
        found = {**found, "url": self.core.result_url(chosen.result_id)}
        if chosen.action is Action.RESULT_JSON:
            body = json.dumps(found, ensure_ascii=False, indent=2).encode() + b"\n"
            return Response(HTTPStatus.OK, body, JSON, _SECURITY_HEADERS)
        nonce = new_nonce()
        csp = ("Content-Security-Policy", content_security_policy(nonce))
        return Response(
            HTTPStatus.OK, result_page(found, nonce=nonce), HTML, (*_SECURITY_HEADERS, csp)
        )


def _content_type(chosen: Format) -> str:
    return NDJSON if chosen is Format.NDJSON else TEXT
