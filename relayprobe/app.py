"""The whole service: the reflector, the canary sink and what an operator needs around them.

Starts the parts in order (history and sink before callers can arrive, the operators' HTTP
endpoint last) and stops them in reverse.
"""

from __future__ import annotations

import contextlib
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable

import structlog

from relayprobe.confirmation.canary import InMemoryRegistry
from relayprobe.confirmation.sink import CanarySink
from relayprobe.confirmation.sinktls import SinkTLSError, sink_tls_context
from relayprobe.frontdoors.core import SessionCore
from relayprobe.frontdoors.telnet import ReflectorService, StartupError, bind_advice
from relayprobe.frontdoors.web import StoredResults, WebFrontDoor
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.operations.metrics import Metrics
from relayprobe.operations.opshttp import OperatorHTTP
from relayprobe.storage.historywriter import HistoryWriter

log = structlog.get_logger("relayprobe")


def new_registry(settings: Settings) -> InMemoryRegistry | None:
    """The token registry when delivery confirmation is on."""
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
    registry: InMemoryRegistry | None,
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
        self.registry = new_registry(settings)
        self.history = (
            HistoryWriter(state_dir=settings.state_dir, retention_days=settings.retention_days)
            if settings.history
            else None
        )
        self.core = SessionCore(
            settings,
            registry=self.registry,
            metrics=self.metrics,
            on_result=self.history.submit if self.history is not None else None,
        )
        self.reflector = ReflectorService(self.core)
        self.web = WebFrontDoor(
            self.core,
            results=(
                None
                if self.history is None
                else StoredResults(
                    settings.state_dir,
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
        if self.history is not None:
            try:
                await self.history.start()
            except (sqlite3.Error, OSError) as exc:
                number, reason = (
                    (exc.errno, exc.strerror or str(exc))
                    if isinstance(exc, OSError)
                    else (None, str(exc))
                )
                raise StartupError(
                    number,
                    f"history: cannot write in {self.settings.state_dir}: {reason}; give "
                    "--state-dir a directory the service may write, or --no-history",
                ) from None
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

    def ready(self) -> bool:
        return bool(self.reflector.servers) and (
            self.registry is None or self.sink_address is not None
        )

    async def shutdown(self) -> None:
        await self._stack.aclose()
