"""Limits on the canary sink's clients: connections per source, unknown recipients, reply rate.

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
from typing import Literal, TypeVar

from relayprobe.access import IPAddress, unmap_ipv4

Refusal = Literal["capacity", "address", "prefix", "throttled"]
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
    max_message_bytes: int = 64 * 1024
    max_unknown_recipients: int = 3
    """Unknown recipients per connection, each answered 550; the next one gets 421 and a close."""
    unknown_recipients_per_minute: int = 30
    """Unknown recipients per prefix and minute; past it the prefix's connections get 421."""
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


class SinkGuard:
    """Decides which connections the sink takes, and counts what they do against their budgets.

    Connection counts are exact (`admit` and `release` pair up). Unknown-recipient budgets are
    token buckets per prefix, forgotten once full again; beyond `max_sources` budgets the least
    recently used are forgotten, which only ever errs towards allowing.
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
        self._max_sources = max_sources
        self._per_address: Counter[IPAddress] = Counter()
        self._per_prefix: Counter[_Prefix] = Counter()
        self.connections = 0
        self._budgets: OrderedDict[_Prefix, _TokenBucket] = OrderedDict()
        rate = limits.replies_per_second
        # One second's worth at once; beyond it, replies wait their turn.
        self._replies = _TokenBucket(rate=rate, burst=rate, now=clock())

    def admit(self, address: IPAddress) -> Refusal | None:
        """Count a new connection from `address` in, or say which limit refuses it."""
        limits = self._limits
        address = unmap_ipv4(address)
        if self.throttled(address):
            return "throttled"
        prefix = self._prefix(address)
        held = self._per_prefix[prefix]
        if self.connections >= limits.max_connections or (
            held and self.connections >= limits.max_connections - limits.reserved_connections
        ):
            return "capacity"
        if self._per_address[address] >= limits.max_connections_per_address:
            return "address"
        if held >= limits.max_connections_per_prefix:
            return "prefix"
        self._per_address[address] += 1
        self._per_prefix[prefix] += 1
        self.connections += 1
        return None

    def release(self, address: IPAddress) -> None:
        """A connection `admit` took has ended."""
        address = unmap_ipv4(address)
        _uncount(self._per_address, address)
        _uncount(self._per_prefix, self._prefix(address))
        self.connections -= 1

    def unknown_recipient(self, address: IPAddress) -> bool:
        """Charge one unknown recipient to the prefix of `address`; False once it is spent."""
        now = self._clock()
        prefix = self._prefix(unmap_ipv4(address))
        self._forget_full_budgets(now)
        budget = self._budgets.get(prefix)
        if budget is None:
            per_minute = self._limits.unknown_recipients_per_minute
            budget = _TokenBucket(rate=per_minute / 60, burst=per_minute, now=now)
            self._budgets[prefix] = budget
            while len(self._budgets) > self._max_sources:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(prefix)
        if budget.refill(now) < 1:
            return False
        budget.tokens -= 1
        return True

    def reply_delay(self) -> float:
        """Take one reply from the shared budget: seconds to wait before reading on (0: none)."""
        replies = self._replies
        # Replies over budget queue up as debt, in the order they were taken.
        replies.tokens = replies.refill(self._clock()) - 1
        return max(0.0, -replies.tokens / replies.rate)

    def throttled(self, address: IPAddress) -> bool:
        """Whether the prefix of `address` has spent its unknown-recipient budget."""
        budget = self._budgets.get(self._prefix(unmap_ipv4(address)))
        return budget is not None and budget.refill(self._clock()) < 1

    def _forget_full_budgets(self, now: float) -> None:
        while self._budgets:
            budget = next(iter(self._budgets.values()))
            if budget.refill(now) < budget.burst:
                return
            self._budgets.popitem(last=False)

    def _prefix(self, address: IPAddress) -> _Prefix:
        bits = address.max_prefixlen
        length = self._limits.ipv4_prefix if address.version == 4 else self._limits.ipv6_prefix
        return address.version, int(address) >> (bits - length) << (bits - length)
