"""The operators' HTTP endpoint: /metrics, /healthz and /readyz, GET and HEAD.

A handler on `HTTPServer`, which bounds and times everything a client sends; routing is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from relayprobe.frontdoors.httpserver import Exchange, HTTPServer, Request, Response
from relayprobe.operations.metrics import Metrics

_ALLOWED_METHODS = ("GET", "HEAD")
_ROUTES = ("/metrics", "/healthz", "/readyz")


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the service can do its job, and what it does without (a shared server down)."""

    ready: bool
    degraded: tuple[str, ...] = ()
    """One line per part that fails: the service still tests callers, with less."""

    def response(self) -> Response:
        """`/readyz`: 503 when not ready; 200 when ready, with what is degraded if anything.
        Degraded is still ready: a replica that lost Redis tests callers as well as any other,
        and taking them all out of a load balancer at once would leave none."""
        if not self.ready:
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, b"not ready")
        if self.degraded:
            return Response(HTTPStatus.OK, ("degraded: " + "; ".join(self.degraded)).encode())
        return Response(HTTPStatus.OK, b"ready")


class OperatorHTTP:
    """Serves /metrics, /healthz and /readyz (GET and HEAD) on one listening address.

    `ready` says whether the service can do its job (listeners bound, sink up) and what it
    does without. A client gets
    `request_line_timeout_s` to send its request line and `timeout_s` for the whole request
    (else 408), and `timeout_s` more to read the response. A newcomer beyond `max_connections`
    at once, or beyond `max_connections_per_source` from its address, takes the place of the
    oldest connection (of that address) still waiting for its request; with none to drop, it
    gets 503 busy.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        ready: Callable[[], Readiness],
        timeout_s: float = 5.0,
        request_line_timeout_s: float = 1.0,
        max_connections: int = 32,
        max_connections_per_source: int = 4,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server = HTTPServer(
            self._handle,
            timeout_s=timeout_s,
            request_line_timeout_s=request_line_timeout_s,
            max_connections=max_connections,
            max_connections_per_source=max_connections_per_source,
            write_timeout_s=timeout_s,
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the address bound."""
        return await self._server.start(host, port)

    async def stop(self) -> None:
        """Stop listening and drop the connections being served."""
        await self._server.stop()

    def respond(self, request: Request) -> Response:
        """The response to a request."""
        if request.path not in _ROUTES:
            return Response(HTTPStatus.NOT_FOUND, b"not found")
        if request.method not in _ALLOWED_METHODS:
            return Response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed",
                headers=(("Allow", ", ".join(_ALLOWED_METHODS)),),
            )
        if request.path == "/metrics":
            body, content_type = self._metrics.exposition()
            return Response(HTTPStatus.OK, body, content_type=content_type)
        if request.path == "/healthz":
            return Response(HTTPStatus.OK, b"ok")
        return self._ready().response()

    async def _handle(self, request: Request, exchange: Exchange) -> None:
        exchange.respond(self.respond(request))
