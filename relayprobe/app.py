"""The whole service: the reflector, the canary sink and what an operator needs around them.

Starts the parts in order (the sink before callers can arrive) and stops them in reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog

from relayprobe.canary import InMemoryRegistry
from relayprobe.config import Endpoint, Settings
from relayprobe.server import ReflectorService, StartupError, bind_advice
from relayprobe.sink import CanarySink

log = structlog.get_logger("relayprobe")


def new_registry(settings: Settings) -> InMemoryRegistry | None:
    """The token registry when delivery confirmation is on."""
    return InMemoryRegistry() if settings.confirmation_off_reason() is None else None


@contextlib.asynccontextmanager
async def canary_sink(
    settings: Settings, registry: InMemoryRegistry | None
) -> AsyncIterator[Endpoint | None]:
    """Run the canary sink for the test domain while in the block; yield where it listens."""
    endpoint = settings.sink_listen
    if registry is None or endpoint is None:
        yield None
        return
    sink = CanarySink(registry=registry, domain=settings.test_domain, hostname=settings.helo_name)
    try:
        host, port = await sink.start(endpoint.host, endpoint.port)
    except OSError as exc:
        raise StartupError(exc.errno, f"canary sink: {bind_advice(endpoint, exc)}") from None
    try:
        yield Endpoint(host, port)
    finally:
        await sink.stop()


class Application:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = new_registry(settings)
        self.reflector = ReflectorService(settings, registry=self.registry)
        self.listening: list[Endpoint] = []
        self.sink_address: Endpoint | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        try:
            self.sink_address = await self._stack.enter_async_context(
                canary_sink(self.settings, self.registry)
            )
            self.listening = await self.reflector.start()
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "listening",
            addresses=[str(endpoint) for endpoint in self.listening],
            sink=str(self.sink_address) if self.sink_address else None,
            test_domain=self.settings.test_domain,
        )
        if self.sink_address is None:
            log.warning(
                "delivery_confirmation_off", reason=self.settings.confirmation_off_reason()
            )

    def ready(self) -> bool:
        return bool(self.listening) and (self.registry is None or self.sink_address is not None)

    async def shutdown(self) -> None:
        await self.reflector.shutdown()
        await self._stack.aclose()
