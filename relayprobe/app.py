"""The whole service: the reflector, the canary sink and what an operator needs around them.

Starts the parts in order (shared state, history and sink before callers can arrive, the
operators' HTTP endpoint last) and stops them in reverse. With `redis_url`, tokens, arrivals and
rate limits are shared with the other replicas through Redis; with `database_url`, the history
through PostgreSQL; without them, everything is this process's own.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog

from relayprobe.confirmation.canary import CanaryRegistry, InMemoryRegistry
from relayprobe.confirmation.sink import CanarySink
from relayprobe.confirmation.sinktls import SinkTLSError, sink_tls_context
from relayprobe.frontdoors.core import SessionCore
from relayprobe.frontdoors.telnet import ReflectorService
from relayprobe.frontdoors.web import StoredResults, WebFrontDoor
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.operations.metrics import Metrics
from relayprobe.operations.opshttp import OperatorHTTP, Readiness
from relayprobe.operations.startup import StartupError, bind_advice
from relayprobe.storage.history import error_line, history_errors, history_location, open_history
from relayprobe.storage.historywriter import HistoryWriter

if TYPE_CHECKING:
    from relayprobe.storage.sharedstate import RedisState

log = structlog.get_logger("relayprobe")


def local_registry(settings: Settings) -> InMemoryRegistry | None:
    """The token registry of one process (`check`, the demo) when delivery confirmation is on."""
    return InMemoryRegistry() if settings.confirmation_off_reason() is None else None


def sink_tls(settings: Settings) -> ssl.SSLContext:
    """The canary sink's TLS context; a certificate or key that cannot be used stops the start."""
    try:
        return sink_tls_context(
            hostname=settings.helo_name,
            cert_file=settings.sink_tls_cert,
            key_file=settings.sink_tls_key,
        )
    except SinkTLSError as exc:
        raise StartupError(None, f"canary sink: {exc}") from None


@contextlib.asynccontextmanager
async def canary_sink(
    settings: Settings,
    registry: CanaryRegistry | None,
    *,
    on_delivery: Callable[[], None] | None = None,
) -> AsyncIterator[Endpoint | None]:
    """Run the canary sink for the test domain while in the block; yield where it listens."""
    endpoint = settings.sink_listen
    if registry is None or endpoint is None:
        yield None
        return
    sink = CanarySink(
        registry=registry,
        domain=settings.test_domain,
        hostname=settings.helo_name,
        limits=settings.sink_limits(),
        on_delivery=on_delivery,
        tls=sink_tls(settings),
    )
    try:
        host, port = await sink.start(endpoint.host, endpoint.port)
    except OSError as exc:
        advice = bind_advice(endpoint, exc, option="--sink-listen")
        raise StartupError(exc.errno, f"canary sink: {advice}") from None
    try:
        yield Endpoint(host, port)
    finally:
        await sink.stop()


class Application:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.redis: RedisState | None = None
        self.registry: CanaryRegistry | None = local_registry(settings)
        if settings.redis_url is not None:
            # Imported here: a single process never loads redis-py.
            from relayprobe.storage.sharedstate import RedisState

            self.redis = RedisState.from_settings(settings.redis_url, settings, self.metrics)
            self.registry = self.redis.registry
        open_backend = functools.partial(
            open_history, state_dir=settings.state_dir, database_url=settings.database_url
        )
        self.history = (
            HistoryWriter(
                open_backend,
                retention_days=settings.retention_days,
                on_dropped=self.metrics.history_dropped,
            )
            if settings.history
            else None
        )
        self.core = SessionCore(
            settings,
            registry=self.registry,
            metrics=self.metrics,
            on_result=self.history.submit if self.history is not None else None,
            limits=None if self.redis is None else self.redis.limits,
        )
        self.reflector = ReflectorService(self.core)
        self.web = WebFrontDoor(
            self.core,
            results=(
                None
                if self.history is None
                else StoredResults(
                    open_backend,
                    retention_days=settings.retention_days,
                    writer=self.history,
                ).find
            ),
        )
        self.web_addresses: list[Endpoint] = []
        self.listening: list[Endpoint] = []
        self.sink_address: Endpoint | None = None
        self.http_address: Endpoint | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "listening",
            addresses=[str(endpoint) for endpoint in self.listening],
            sink=str(self.sink_address) if self.sink_address else None,
            http=str(self.http_address) if self.http_address else None,
            web=[str(endpoint) for endpoint in self.web_addresses],
            test_domain=self.settings.test_domain,
        )
        if self.sink_address is None:
            log.warning("delivery_confirmation_off", reason=self.settings.confirmation_off_reason())

    async def _start(self) -> None:
        if self.redis is not None:
            self._stack.push_async_callback(self.redis.aclose)
            await self.redis.start()
        if self.history is not None:
            await self._start_history(self.history)
            self._stack.push_async_callback(self.history.stop)
        self.sink_address = await self._stack.enter_async_context(
            canary_sink(self.settings, self.registry, on_delivery=self.metrics.sink_delivery)
        )
        # Stopped in reverse: the reflector's shutdown stops every test (the web door's too),
        # so that a curl caller reads the shutdown notice before its listener goes.
        self._stack.push_async_callback(self.web.stop)
        self._stack.push_async_callback(self.reflector.shutdown)
        self.listening = await self.reflector.start()
        self.web_addresses = await self.web.start(self.settings.web_listen)
        endpoint = self.settings.http_listen
        if endpoint is not None:
            http = OperatorHTTP(metrics=self.metrics, ready=self.ready)
            try:
                host, port = await http.start(endpoint.host, endpoint.port)
            except OSError as exc:
                advice = bind_advice(endpoint, exc, option="--http-listen")
                raise StartupError(exc.errno, f"HTTP endpoint: {advice}") from None
            self._stack.push_async_callback(http.stop)
            self.http_address = Endpoint(host, port)

    async def _start_history(self, history: HistoryWriter) -> None:
        settings = self.settings
        try:
            await history.start()
        except history_errors() as exc:
            number = exc.errno if isinstance(exc, OSError) else None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else error_line(exc)
            where = history_location(
                state_dir=settings.state_dir, database_url=settings.database_url
            )
            advice = (
                "give --state-dir a directory the service may write, or --no-history"
                if settings.database_url is None
                else "check --database-url and that the database accepts this user, or --no-history"
            )
            raise StartupError(
                number, f"history: cannot write in {where}: {reason}; {advice}"
            ) from None

    def ready(self) -> Readiness:
        """Ready when the listeners are bound and, with confirmation on, the sink is up;
        degraded while a shared server fails (the service still tests callers, with less)."""
        ready = bool(self.reflector.servers) and (
            self.registry is None or self.sink_address is not None
        )
        degraded = [] if self.redis is None else self.redis.degraded()
        if self.history is not None and self.history.last_error is not None:
            degraded.append(f"history: {self.history.last_error}")
        return Readiness(ready, tuple(degraded))

    async def shutdown(self) -> None:
        await self._stack.aclose()
