"""Who may start a relay test, and how often.

Pure: no I/O, and the rate limiter reads time only through the injected clock. IPv4-mapped
IPv6 addresses (::ffff:192.0.2.1) count as the IPv4 address they carry, everywhere
(`addresses.unmap_ipv4`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal, NamedTuple, TypedDict, Unpack

from relayprobe.frontdoors.addresses import IPAddress, IPNetwork, parse_network, unmap_ipv4

Reason = Literal["address", "prefix", "global"]


class AccessPolicy:
    """Allow and deny lists of networks: deny wins; an empty allow list allows everyone."""

    def __init__(
        self, *, allow: Sequence[str | IPNetwork] = (), deny: Sequence[str | IPNetwork] = ()
    ) -> None:
        for name, values in (("allow", allow), ("deny", deny)):
            if isinstance(values, str):
                raise TypeError(f"{name} must be a sequence of networks, not one string")
        self._allow = tuple(parse_network(value) for value in allow)
        self._deny = tuple(parse_network(value) for value in deny)

    def permits(self, address: IPAddress) -> bool:
        address = unmap_ipv4(address)
        if any(address in network for network in self._deny):
            return False
        return not self._allow or any(address in network for network in self._allow)


class TokenBucket:
    """Up to `capacity` at once, refilled at `rate` per second. Pure: callers pass the time."""

    __slots__ = ("_capacity", "_level", "_rate", "_refilled_at")

    def __init__(self, *, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be > 0, not {rate} and {capacity}")
        self._rate = rate
        self._capacity = capacity
        self._level = capacity
        self._refilled_at = now

    def wait(self, now: float, amount: float = 1.0) -> float:
        """Seconds until `amount` can be taken; 0 when it can be now."""
        self._level = min(self._capacity, self._level + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        return 0.0 if self._level >= amount else (amount - self._level) / self._rate

    def take(self, amount: float = 1.0) -> None:
        self._level -= amount

    def give_back(self, amount: float = 1.0) -> None:
        self._level = min(self._capacity, self._level + amount)


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Whether a test may start now; if not, which limit said no and for how long."""

    allowed: bool
    reason: Reason | None = None
    retry_after: float = 0.0


Scope = Literal["address", "prefix"]


def longest_wait(waits: Iterable[tuple[float, Reason]]) -> RateDecision:
    """The decision given how long each limit says to wait (0 or less: now). The longest wait is
    the earliest moment every limit could allow the test; on a tie the first limit named wins."""
    wait, reason = max(waits, key=lambda item: item[0])
    if wait > 0:
        return RateDecision(allowed=False, reason=reason, retry_after=wait)
    return RateDecision(allowed=True)


class RateKey(NamedTuple):
    """What one sliding window counts: an address, or the network prefix it is in."""

    scope: Scope
    version: int
    network: int
    length: int

    def __str__(self) -> str:
        number = IPv4Address(self.network) if self.version == 4 else IPv6Address(self.network)
        return f"{self.scope}:{number}/{self.length}"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The limits on test starts, for every limiter that enforces them.

    Per address: one start in any `per_address_interval` seconds. Per prefix (an IPv4 /24 or
    IPv6 /56 by default): `per_prefix` starts in any `prefix_window` seconds. Globally: a token
    bucket refilled at `global_per_second`, holding at most `global_burst`.
    """

    per_address_interval: float = 60.0
    per_prefix: int = 10
    prefix_window: float = 60.0
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    global_per_second: float = 5.0
    global_burst: int = 5

    def __post_init__(self) -> None:
        if self.per_address_interval < 0 or self.prefix_window < 0:
            raise ValueError("per_address_interval and prefix_window must be >= 0")
        if self.per_prefix < 1:
            raise ValueError(f"per_prefix must be >= 1, not {self.per_prefix}")
        if not 0 <= self.ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be in 0..32, not {self.ipv4_prefix}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be in 0..128, not {self.ipv6_prefix}")
        if self.global_per_second <= 0:
            raise ValueError(f"global_per_second must be > 0, not {self.global_per_second}")
        if self.global_burst < 1:
            raise ValueError(f"global_burst must be >= 1, not {self.global_burst}")

    def window(self, scope: Scope) -> tuple[int, float]:
        """How many starts a window of `scope` allows, and how many seconds it spans."""
        if scope == "address":
            return 1, self.per_address_interval
        return self.per_prefix, self.prefix_window

    def keys(self, address: IPAddress) -> tuple[RateKey, RateKey]:
        """The windows a start from `address` counts in: its own and its prefix's. An
        IPv4-mapped address counts as the IPv4 address it carries."""
        address = unmap_ipv4(address)
        bits = address.max_prefixlen
        length = self.ipv4_prefix if address.version == 4 else self.ipv6_prefix
        network = int(address) >> (bits - length) << (bits - length)
        return (
            RateKey("address", address.version, int(address), bits),
            RateKey("prefix", address.version, network, length),
        )


class RateLimitOptions(TypedDict, total=False):
    """The fields of `RateLimits`, as keywords of the limiters."""

    per_address_interval: float
    per_prefix: int
    prefix_window: float
    ipv4_prefix: int
    ipv6_prefix: int
    global_per_second: float
    global_burst: int


class RateLimiter:
    """Limits on test starts (`RateLimits`, given as keywords), kept in this process.

    `check()` decides and, when it allows, records the start; a refusal consumes nothing.
    Per-address and per-prefix limits are sliding windows (at most N starts in any W seconds);
    the global limit is a token bucket. Expired entries are dropped oldest first. The global
    rate bounds how many entries can be live at once (2 * (burst + rate * window)); beyond
    `max_entries` the least recently used entries are forgotten, which only ever errs towards
    allowing a test.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        **limits: Unpack[RateLimitOptions],
    ) -> None:
        self.limits = RateLimits(**limits)
        # One allowed test adds up to two keys; fewer would evict the entries just written.
        if max_entries < 2:
            raise ValueError(f"max_entries must be >= 2, not {max_entries}")
        self._max_entries = max_entries
        self._windows = {scope: self.limits.window(scope) for scope in ("address", "prefix")}
        self._clock = clock
        self._global = TokenBucket(
            rate=self.limits.global_per_second, capacity=self.limits.global_burst, now=clock()
        )
        # Ordered by last recorded start, so the front is always the least recently used.
        self._logs: OrderedDict[RateKey, deque[float]] = OrderedDict()

    @property
    def tracked_keys(self) -> int:
        """How many addresses and prefixes are remembered."""
        return len(self._logs)

    def check(self, address: IPAddress) -> RateDecision:
        """Decide whether `address` may start a test now, and record the start if so."""
        now = self._clock()
        decision, keys = self._decide(address, now)
        if not decision.allowed:
            return decision
        for key in keys:
            self._record(key, now)
        self._global.take()
        while len(self._logs) > self._max_entries:
            self._logs.popitem(last=False)
        return decision

    def peek(self, address: IPAddress) -> RateDecision:
        """What `check` would decide now, recording nothing: for a page that says whether the
        visitor may test."""
        return self._decide(address, self._clock())[0]

    def _decide(self, address: IPAddress, now: float) -> tuple[RateDecision, tuple[RateKey, ...]]:
        self._drop_expired(now)
        keys = self.limits.keys(address)
        waits = [(self._window_wait(key, now), key.scope) for key in keys]
        return longest_wait([*waits, (self._global.wait(now), "global")]), keys

    def refund_global(self) -> None:
        """Give back the global token of a test that ended before it cost anything: a caller
        that connected and left at once must not use up everyone else's share. The per-address
        and per-prefix limits stay charged."""
        self._global.give_back()

    def _window_wait(self, key: RateKey, now: float) -> float:
        log = self._logs.get(key)
        if log is None:
            return 0.0
        count, window = self._windows[key.scope]
        while log and now - log[0] >= window:
            log.popleft()
        if not log:
            del self._logs[key]
            return 0.0
        if len(log) < count:
            return 0.0
        # Written so that it is > 0 whenever the age test above found the entry live.
        return window - (now - log[0])

    def _record(self, key: RateKey, now: float) -> None:
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = deque(maxlen=self._windows[key.scope][0])
        else:
            self._logs.move_to_end(key)
        log.append(now)

    def _drop_expired(self, now: float) -> None:
        while self._logs:
            key, log = next(iter(self._logs.items()))
            if now - log[-1] < self._windows[key.scope][1]:
                return
            del self._logs[key]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a caller may not test now: a metrics label and the one line the caller reads."""

    reason: str
    message: str
    retry_after_s: int | None = None
    """When trying again may work, for HTTP's Retry-After; None when it won't by itself."""


ACCESS_REFUSAL = Refusal("access", "This service tests only customer networks")
_RATE_WHO = {"address": "your address", "prefix": "your network", "global": "everyone"}


def rate_refusal(decision: RateDecision) -> Refusal:
    """The refusal for a rate limit: which one, and when to come back."""
    reason = decision.reason or "global"
    seconds = max(1, math.ceil(decision.retry_after))
    return Refusal(
        f"rate_{reason}",
        f"Too many tests from {_RATE_WHO[reason]}; try again in {seconds} s",
        retry_after_s=seconds,
    )
