"""Limits on the canary sink's clients: connections per source, unknown recipients, message bytes
and reply rate.

Pure: no I/O, and time comes only from the injected clock. A source is counted by its address and
by its network prefix (an IPv4 /24 or IPv6 /48 by default: an attacker rarely has fewer, and a
mail relay rarely more); IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from relayprobe.frontdoors.addresses import IPAddress, unmap_ipv4

Refusal = Literal["capacity", "address", "prefix"]
# (IP version, network number): one prefix.
_Prefix = tuple[int, int]
_Key = TypeVar("_Key", bound=Hashable)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkLimits:
    """What one sink allows; `ValueError` names the first value that makes no sense."""

    max_connections: int = 100
    """Connections at once, from everyone."""
    reserved_connections: int = 20
    """Of `max_connections`, how many only a prefix that holds no connection may take."""
    max_connections_per_address: int = 10
    max_connections_per_prefix: int = 20
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    idle_timeout: float = 10.0
    """Seconds a connection may wait between two commands."""
    connection_timeout: float = 60.0
    """Seconds a connection may last, however busy."""
    recipient_timeout: float = 10.0
    """Seconds from connect by which a connection must name a recipient of a pending test."""
    max_message_bytes: int = 64 * 1024
    message_bytes_per_second: int = 64 * 1024
    """Message bytes per prefix and second, after a second's worth at once; beyond, reads wait."""
    max_unknown_recipients: int = 3
    """Unknown recipients per connection, each answered 550; the next one gets 421 and a close."""
    unknown_recipients_per_minute: int = 30
    """Unknown recipients per prefix and minute; past it each one gets 421 and a close."""
    replies_per_second: float = 1000.0
    """Replies of all connections together: bounds the sink's share of the event loop."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value <= 0:
                raise ValueError(f"{item.name} must be positive, not {value}")
        if self.reserved_connections >= self.max_connections:
            raise ValueError(
                f"reserved_connections ({self.reserved_connections}) must be below "
                f"max_connections ({self.max_connections})"
            )
        if self.ipv4_prefix > 32 or self.ipv6_prefix > 128:
            raise ValueError("ipv4_prefix must be at most 32 and ipv6_prefix at most 128")


@dataclass(frozen=True, slots=True)
class Admitted(Generic[_Key]):
    """A connection `SinkGuard.admit` took; `evicted`, if any, is the one to close for it."""

    evicted: _Key | None = None


def _uncount(counts: Counter[_Key], key: _Key) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class _TokenBucket:
    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated_at = now

    def refill(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate)
        self.updated_at = now
        return self.tokens

    def delay(self, amount: float, now: float) -> float:
        """Take `amount`, into debt if need be: seconds until the debt is paid (0: none).

        Takers over budget wait in the order they took."""
        self.tokens = self.refill(now) - amount
        return max(0.0, -self.tokens / self.rate)


class _PrefixBudgets:
    """A token bucket per prefix, made when first charged and forgotten once full again; beyond
    `max_sources` the least recently used are forgotten, which only ever errs towards allowing."""

    def __init__(self, *, rate: float, burst: float, max_sources: int) -> None:
        self._rate = rate
        self._burst = burst
        self._max_sources = max_sources
        self._buckets: OrderedDict[_Prefix, _TokenBucket] = OrderedDict()

    def get(self, prefix: _Prefix) -> _TokenBucket | None:
        return self._buckets.get(prefix)

    def charge(self, prefix: _Prefix, now: float) -> _TokenBucket:
        """The bucket of `prefix`, refilled to `now`, to take from."""
        self._forget_full(now)
        bucket = self._buckets.get(prefix)
        if bucket is None:
            bucket = _TokenBucket(rate=self._rate, burst=self._burst, now=now)
            self._buckets[prefix] = bucket
            while len(self._buckets) > self._max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(prefix)
        bucket.refill(now)
        return bucket

    def _forget_full(self, now: float) -> None:
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if bucket.refill(now) < bucket.burst:
                return
            self._buckets.popitem(last=False)


@dataclass(slots=True)
class _Connection:
    address: IPAddress
    prefix: _Prefix
    delivering: bool = False


class SinkGuard(Generic[_Key]):
    """Decides which connections the sink takes, and counts what they do against their budgets.

    Connections are known by a key of the caller's choice (the sink uses the transport). Counts
    are exact: `admit` counts a connection in, `release` or an eviction counts it out. A full
    sink makes room by evicting a connection that has not named a pending test's recipient
    (`delivering`), from the prefix holding the most connections, the oldest first: a newcomer
    from a network holding fewer connections always gets in, and one network reconnecting
    quickly only evicts its own.
    """

    def __init__(
        self,
        limits: SinkLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 100_000,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._live: dict[_Key, _Connection] = {}
        self._per_address: Counter[IPAddress] = Counter()
        self._per_prefix: Counter[_Prefix] = Counter()
        per_minute = limits.unknown_recipients_per_minute
        self._unknown_recipients = _PrefixBudgets(
            rate=per_minute / 60, burst=per_minute, max_sources=max_sources
        )
        byte_rate = limits.message_bytes_per_second
        self._message_bytes = _PrefixBudgets(
            rate=byte_rate, burst=byte_rate, max_sources=max_sources
        )
        rate = limits.replies_per_second
        # One second's worth at once; beyond it, replies wait their turn.
        self._replies = _TokenBucket(rate=rate, burst=rate, now=clock())

    @property
    def connections(self) -> int:
        return len(self._live)

    def admit(self, connection: _Key, address: IPAddress) -> Admitted[_Key] | Refusal:
        """Count `connection` from `address` in, or say which limit refuses it."""
        limits = self._limits
        address = unmap_ipv4(address)
        prefix = self._prefix(address)
        held = self._per_prefix[prefix]
        if self._per_address[address] >= limits.max_connections_per_address:
            return "address"
        if held >= limits.max_connections_per_prefix:
            return "prefix"
        evicted = None
        if self.connections >= limits.max_connections or (
            held and self.connections >= limits.max_connections - limits.reserved_connections
        ):
            evicted = self._eviction_for(held)
            if evicted is None:
                return "capacity"
            self.release(evicted)
        self._live[connection] = _Connection(address, prefix)
        self._per_address[address] += 1
        self._per_prefix[prefix] += 1
        return Admitted(evicted)

    def delivering(self, connection: _Key) -> None:
        """`connection` named a pending test's recipient: it is never evicted."""
        if connection in self._live:
            self._live[connection].delivering = True

    def release(self, connection: _Key) -> None:
        """`connection` has ended; nothing if it was evicted or never admitted."""
        ended = self._live.pop(connection, None)
        if ended is not None:
            _uncount(self._per_address, ended.address)
            _uncount(self._per_prefix, ended.prefix)

    def unknown_recipient(self, address: IPAddress) -> bool:
        """Charge one unknown recipient to the prefix of `address`; False once it is spent."""
        budget = self._unknown_recipients.charge(self._prefix(unmap_ipv4(address)), self._clock())
        if budget.tokens < 1:
            return False
        budget.tokens -= 1
        return True

    def message_delay(self, address: IPAddress, size: int) -> float:
        """Charge `size` message bytes to the prefix of `address`: seconds to wait before
        reading on (0: none)."""
        now = self._clock()
        return self._message_bytes.charge(self._prefix(unmap_ipv4(address)), now).delay(size, now)

    def reply_delay(self) -> float:
        """Take one reply from the shared budget: seconds to wait before reading on (0: none)."""
        return self._replies.delay(1, self._clock())

    def throttled(self, address: IPAddress) -> bool:
        """Whether the prefix of `address` has spent its unknown-recipient budget."""
        budget = self._unknown_recipients.get(self._prefix(unmap_ipv4(address)))
        return budget is not None and budget.refill(self._clock()) < 1

    def _eviction_for(self, held: int) -> _Key | None:
        """The connection a newcomer from a prefix holding `held` may evict, if any."""
        evictable = [key for key, live in self._live.items() if not live.delivering]
        if not evictable:
            return None
        # max() keeps the first of equals, and the table is in the order of admission.
        oldest = max(evictable, key=lambda key: self._per_prefix[self._live[key].prefix])
        return oldest if self._per_prefix[self._live[oldest].prefix] > held else None

    def _prefix(self, address: IPAddress) -> _Prefix:
        bits = address.max_prefixlen
        length = self._limits.ipv4_prefix if address.version == 4 else self._limits.ipv6_prefix
        return address.version, int(address) >> (bits - length) << (bits - length)
