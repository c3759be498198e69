"""What replicas share through Redis: the token registry and the rate limits, made, started,
checked and closed together. Only a service with `redis_url` imports this (and redis-py).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from relayprobe.confirmation.redisregistry import RedisRegistry
from relayprobe.frontdoors.core import rate_limits
from relayprobe.frontdoors.sharedlimits import SharedRateLimiter
from relayprobe.operations.config import Settings
from relayprobe.operations.metrics import Metrics
from relayprobe.storage import redisclient

# Admissions are short and one at a time per caller: a few connections carry them all.
RATE_LIMIT_CONNECTIONS = 20


@dataclass(frozen=True, slots=True)
class RedisState:
    registry: RedisRegistry | None
    """Tokens and arrivals, when delivery confirmation is on."""
    limits: SharedRateLimiter | None
    """The rate limits, when they are on."""
    limits_client: Redis | None
    """The limiter's own client, so that a flood of registry calls never delays an admission."""

    @classmethod
    def from_settings(cls, url: str, settings: Settings, metrics: Metrics) -> RedisState:
        """Nothing connects yet: `start` does, or the first call."""
        registry = (
            RedisRegistry(
                url, timeout_s=settings.redis_timeout, on_unavailable=metrics.registry_failure
            )
            if settings.confirmation_off_reason() is None
            else None
        )
        client = (
            redisclient.connect(
                url, timeout_s=settings.redis_timeout, max_connections=RATE_LIMIT_CONNECTIONS
            )
            if settings.rate_limit
            else None
        )
        limits = (
            None
            if client is None
            else SharedRateLimiter(
                client,
                timeout_s=settings.redis_timeout,
                on_fallback=metrics.rate_limit_fallback,
                **rate_limits(settings),
            )
        )
        return cls(registry, limits, client)

    async def start(self) -> None:
        """Subscribe to arrivals; Redis away at the start is no reason to stop (the registry
        keeps trying, tests run meanwhile)."""
        if self.registry is not None:
            await self.registry.start()

    async def aclose(self) -> None:
        if self.registry is not None:
            await self.registry.aclose()
        if self.limits_client is not None:
            await self.limits_client.aclose()

    def degraded(self) -> list[str]:
        """What fails now, one line each, for /readyz."""
        lines = []
        if self.registry is not None and self.registry.last_error is not None:
            lines.append(f"token registry: {self.registry.last_error}")
        if self.limits is not None and self.limits.degraded:
            lines.append(f"rate limits per replica: {self.limits.last_error}")
        return lines
