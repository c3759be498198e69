"""The rate limits of `access.RateLimiter`, shared by every replica through Redis.

Each admission is one Lua script, so one round trip (EVALSHA; once after Redis lost its script
cache, SCRIPT LOAD and EVALSHA again). It reads Redis's own clock, so replicas with skewed clocks
agree, checks the address and prefix windows and the global token bucket, and records the start
only if all three allow. Windows are lists of start times, newest first and at most as long as
the limit; the bucket is a hash. Every key expires when it no longer limits anything.

When Redis fails or is slow (every call is bounded by `timeout_s`), decisions fall back to a
limiter of this process's own with the same limits until Redis answers again: a replica then
allows up to what it alone would, never blocks, and says so in the log, the `on_fallback` hook
and `degraded`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal, Unpack

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from relayprobe.frontdoors.access import (
    RateDecision,
    RateLimiter,
    RateLimitOptions,
    RateLimits,
    longest_wait,
)
from relayprobe.frontdoors.addresses import IPAddress
from relayprobe.storage import redisclient

log = structlog.get_logger("relayprobe.frontdoors.sharedlimits")

DEFAULT_KEY_PREFIX = "relayprobe:rate:"

_Mode = Literal["check", "peek", "refund"]

# Times are whole microseconds: Lua numbers are doubles, exact for integers below 2**53, and a
# Lua number becomes a Redis integer reply, so fractions would be cut off.
_LIMITS_SCRIPT = """
-- KEYS: the address window, the prefix window, the global bucket (a refund: the bucket only).
-- ARGV: mode ('check', 'peek' or 'refund'), now in microseconds ('' for Redis's clock),
--       address interval (microseconds), prefix count, prefix window (microseconds),
--       global rate (tokens per second), global burst.
-- Returns how many microseconds each limit asks to wait: address, prefix, global.
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local stamp = string.format('%d', now)
local rate, burst = tonumber(ARGV[6]), tonumber(ARGV[7])
local bucket = KEYS[#KEYS]

-- The token bucket's level now; a missing bucket is full.
local level = burst
local stored = redis.call('HMGET', bucket, 'level', 'at')
if stored[1] then
  local elapsed = math.max(0, now - tonumber(stored[2]))
  level = math.min(burst, tonumber(stored[1]) + elapsed * rate / 1000000)
end

-- A full bucket is a missing one, so a refund never lifts the level beyond the burst.
local function store_level(new_level)
  if new_level >= burst then
    redis.call('DEL', bucket)
    return
  end
  redis.call('HSET', bucket, 'level', string.format('%.17g', new_level), 'at', stamp)
  -- Once the bucket would be full again, it may as well be missing.
  redis.call('PEXPIRE', bucket, math.ceil((burst - new_level) / rate * 1000))
end

if mode == 'refund' then
  store_level(level + 1)
  return {}
end

local windows = {
  {KEYS[1], 1, tonumber(ARGV[3])},
  {KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5])},
}
local waits = {}
local allowed = true
for index, window in ipairs(windows) do
  local key, count, span = window[1], window[2], window[3]
  local wait = 0
  -- The oldest of the last `count` starts: while it is live, the window is full.
  local oldest = span > 0 and redis.call('LINDEX', key, count - 1)
  if oldest then
    -- Never longer than the window, even if Redis's clock went back (a failover).
    wait = math.min(span, math.max(0, span - (now - tonumber(oldest))))
  end
  waits[index] = wait
  allowed = allowed and wait == 0
end
local global_wait = 0
if level < 1 then
  -- Nearest, not up: a wait of 60.0000001 s would read "61 s" to the caller; at least 1.
  global_wait = math.max(1, math.floor((1 - level) / rate * 1000000 + 0.5))
  allowed = false
end
waits[3] = global_wait

if allowed and mode == 'check' then
  for _, window in ipairs(windows) do
    local key, count, span = window[1], window[2], window[3]
    if span > 0 then
      redis.call('LPUSH', key, stamp)
      redis.call('LTRIM', key, 0, count - 1)
      redis.call('PEXPIRE', key, math.ceil(span / 1000))
    end
  end
  store_level(level - 1)
end
return waits
"""


def _microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


class SharedRateLimiter:
    """`access.RateLimiter`'s limits and decisions, kept in Redis for every replica.

    `client` is shared with whatever else uses Redis; make it with `redisclient.connect`. The
    limits are the keywords of `access.RateLimits`. While degraded, Redis is tried again at
    most every `probe_interval_s` (the first decision after that waits up to `timeout_s` once
    more); decisions in between are made locally at once, so an outage costs each caller
    nothing and Redis no connection storm.
    `clock` (seconds) replaces Redis's clock and the local one, for tests.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = 0.2,
        probe_interval_s: float = 1.0,
        on_fallback: Callable[[], None] | None = None,
        max_entries: int = 100_000,
        clock: Callable[[], float] | None = None,
        **limits: Unpack[RateLimitOptions],
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        if probe_interval_s < 0:
            raise ValueError(f"probe_interval_s must be >= 0, not {probe_interval_s}")
        self.limits = RateLimits(**limits)
        self._local_clock = clock or time.monotonic
        self._local = RateLimiter(max_entries=max_entries, clock=self._local_clock, **limits)
        self._script = client.register_script(_LIMITS_SCRIPT)
        self._key_prefix = key_prefix
        self._global_key = f"{key_prefix}global"
        self._timeout_s = timeout_s
        self._probe_interval_s = probe_interval_s
        self._on_fallback = on_fallback
        self._clock = clock
        self._limit_args = (
            _microseconds(self.limits.per_address_interval),
            self.limits.per_prefix,
            _microseconds(self.limits.prefix_window),
            self.limits.global_per_second,
            self.limits.global_burst,
        )
        self.last_error: str | None = None
        """Why Redis last failed, while degraded; None while Redis answers."""
        self._probe_at = 0.0

    @property
    def degraded(self) -> bool:
        """Whether decisions are made by this replica alone, Redis having failed."""
        return self.last_error is not None

    async def check(self, address: IPAddress) -> RateDecision:
        """Decide whether `address` may start a test now, and record the start if so."""
        return await self._decide("check", address, self._local.check)

    async def peek(self, address: IPAddress) -> RateDecision:
        """What `check` would decide now, recording nothing."""
        return await self._decide("peek", address, self._local.peek)

    async def refund_global(self) -> None:
        """Give back a global token, as `access.RateLimiter.refund_global` does; while Redis
        fails, to the local limiter."""
        if await self._call("refund", [self._global_key]) is None:
            self._local.refund_global()

    async def _decide(
        self, mode: _Mode, address: IPAddress, local: Callable[[IPAddress], RateDecision]
    ) -> RateDecision:
        keys = [f"{self._key_prefix}{key}" for key in self.limits.keys(address)]
        waits = await self._call(mode, [*keys, self._global_key])
        if waits is None:
            if self._on_fallback is not None:
                self._on_fallback()
            return local(address)
        address_us, prefix_us, global_us = waits
        return longest_wait(
            [
                (address_us / 1_000_000, "address"),
                (prefix_us / 1_000_000, "prefix"),
                (global_us / 1_000_000, "global"),
            ]
        )

    async def _call(self, mode: _Mode, keys: list[str]) -> list[int] | None:
        """The script's reply, or None when Redis failed (or is not tried again yet)."""
        if self.degraded:
            if self._local_clock() < self._probe_at:
                return None
            # One caller tries Redis again; the others meanwhile decide at once, locally.
            self._probe_at = self._local_clock() + self._probe_interval_s
        now = "" if self._clock is None else _microseconds(self._clock())
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=[mode, now, *self._limit_args])
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            return None
        if self.degraded:
            log.info("rate_limit_shared_again", after=self.last_error)
            self.last_error = None
        return [int(wait) for wait in reply]

    def _failed(self, error: Exception) -> None:
        self._probe_at = self._local_clock() + self._probe_interval_s
        if self.degraded:
            return
        reason = redisclient.failure_reason(error, timeout_s=self._timeout_s)
        self.last_error = reason
        # Redis answered with an error: a bug here or a misconfigured server, worth a traceback.
        # Otherwise it is unreachable or slow, which one line says.
        traceback = error if isinstance(error, ResponseError) else None
        log.warning("rate_limit_fallback", reason=reason, exc_info=traceback)
