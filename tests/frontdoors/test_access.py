from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.frontdoors.access import AccessPolicy, RateDecision, RateLimiter, RateLimits
from relayprobe.frontdoors.addresses import IPAddress, parse_network, unmap_ipv4

ALLOWED = RateDecision(allowed=True)


def ip(text: str) -> IPAddress:
    return ip_address(text)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Every rate limit off: tests turn on the ones they are about.
UNLIMITED: dict[str, Any] = {
    "per_address_interval": 0.0,
    "per_prefix": 10**9,
    "global_per_second": 1e9,
    "global_burst": 10**9,
}


def limiter(clock: FakeClock, **overrides: Any) -> RateLimiter:
    """A limiter whose limits are all off unless `overrides` turns them on."""
    return RateLimiter(**(UNLIMITED | overrides), clock=clock)


# Access policy


def test_deny_wins_over_allow() -> None:
    policy = AccessPolicy(allow=["192.0.2.0/24"], deny=["192.0.2.128/25"])
    assert policy.permits(ip("192.0.2.1"))
    assert not policy.permits(ip("192.0.2.200"))
    assert not policy.permits(ip("198.51.100.1"))


def test_empty_allow_list_allows_everyone_but_the_denied() -> None:
    assert AccessPolicy().permits(ip("203.0.113.9"))
    assert AccessPolicy().permits(ip("2001:db8::9"))
    policy = AccessPolicy(deny=["203.0.113.0/24", "2001:db8::/32"])
    assert not policy.permits(ip("203.0.113.9"))
    assert not policy.permits(ip("2001:db8::9"))
    assert policy.permits(ip("198.51.100.1"))
    assert policy.permits(ip("2001:db9::1"))


def test_ipv6_networks() -> None:
    policy = AccessPolicy(allow=["2001:db8::/32"], deny=["2001:db8:bad::/48"])
    assert policy.permits(ip("2001:db8::1"))
    assert not policy.permits(ip("2001:db8:bad::1"))
    assert not policy.permits(ip("2001:db9::1"))
    assert not policy.permits(ip("192.0.2.1"))


def test_ipv4_mapped_addresses_are_checked_as_ipv4() -> None:
    policy = AccessPolicy(allow=["192.0.2.0/24"], deny=["192.0.2.66/32"])
    assert policy.permits(ip("::ffff:192.0.2.1"))
    assert not policy.permits(ip("::ffff:192.0.2.66"))
    assert not policy.permits(ip("::ffff:198.51.100.1"))


def test_ipv4_mapped_rules_match_ipv4_addresses() -> None:
    assert parse_network("::ffff:192.0.2.0/120") == IPv4Network("192.0.2.0/24")
    policy = AccessPolicy(deny=["::ffff:192.0.2.0/120"])
    assert not policy.permits(ip("192.0.2.5"))
    assert not policy.permits(ip("::ffff:192.0.2.5"))
    assert policy.permits(ip("192.0.3.5"))


def test_network_objects_and_bare_addresses() -> None:
    policy = AccessPolicy(allow=[IPv4Network("198.51.100.0/24"), IPv6Network("::1/128"), "::2"])
    assert policy.permits(ip("198.51.100.7"))
    assert policy.permits(ip("::1"))
    assert policy.permits(ip("::2"))
    assert not policy.permits(ip("::3"))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("192.0.2.1/24", "host bits set"),
        ("2001:db8::1/32", "host bits set"),
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("bogus", "bogus"),
        ("", "does not appear"),
    ],
)
def test_bad_network_is_a_clear_error(value: str, problem: str) -> None:
    for options in ({"allow": [value]}, {"deny": ["10.0.0.0/8", value]}):
        with pytest.raises(ValueError, match=re.escape(f"invalid network '{value}'")) as info:
            AccessPolicy(**options)
        assert problem in str(info.value)


def test_a_single_string_is_not_a_list() -> None:
    with pytest.raises(TypeError, match="allow"):
        AccessPolicy(allow="10.0.0.0/8")


def test_unmap_ipv4() -> None:
    assert unmap_ipv4(ip("::ffff:192.0.2.1")) == IPv4Address("192.0.2.1")
    assert unmap_ipv4(ip("2001:db8::1")) == IPv6Address("2001:db8::1")
    assert unmap_ipv4(ip("192.0.2.1")) == IPv4Address("192.0.2.1")


# Rate limiter


def test_per_address_interval() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=60.0)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    clock.advance(59.5)
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "address", 0.5)
    clock.advance(0.5)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)


def test_per_prefix_sliding_window() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=1000.0, per_prefix=3, prefix_window=60.0)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    clock.advance(10)
    assert limits.check(ip("192.0.2.2")) == ALLOWED
    clock.advance(10)
    assert limits.check(ip("192.0.2.3")) == ALLOWED
    assert limits.check(ip("192.0.2.4")) == RateDecision(False, "prefix", 40.0)
    assert limits.check(ip("192.0.3.1")) == ALLOWED
    clock.advance(40)
    assert limits.check(ip("192.0.2.4")) == ALLOWED
    assert limits.check(ip("192.0.2.5")) == RateDecision(False, "prefix", 10.0)


def test_ipv6_prefix_groups_a_slash_56() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_prefix=1)
    assert limits.check(ip("2001:db8:0:1::1")) == ALLOWED
    assert limits.check(ip("2001:db8:0:ff::1")).reason == "prefix"
    assert limits.check(ip("2001:db8:0:100::1")) == ALLOWED


def test_prefix_lengths_are_configurable() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_prefix=1, ipv4_prefix=16, ipv6_prefix=64)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("192.0.200.1")).reason == "prefix"
    assert limits.check(ip("192.1.2.1")) == ALLOWED
    assert limits.check(ip("2001:db8:0:1::1")) == ALLOWED
    assert limits.check(ip("2001:db8:0:2::1")) == ALLOWED


def test_rate_keys_name_the_address_and_its_prefix() -> None:
    limits = RateLimits(ipv4_prefix=24, ipv6_prefix=56)
    assert [str(key) for key in limits.keys(ip("::ffff:192.0.2.77"))] == [
        "address:192.0.2.77/32",
        "prefix:192.0.2.0/24",
    ]
    assert [str(key) for key in limits.keys(ip("2001:db8:0:1ff::1"))] == [
        "address:2001:db8:0:1ff::1/128",
        "prefix:2001:db8:0:100::/56",
    ]
    assert str(RateLimits(ipv4_prefix=0).keys(ip("192.0.2.1"))[1]) == "prefix:0.0.0.0/0"


def test_ipv4_mapped_counts_as_ipv4() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=60.0, per_prefix=2)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("::ffff:192.0.2.1")).reason == "address"
    assert limits.check(ip("::ffff:192.0.2.2")) == ALLOWED
    assert limits.check(ip("192.0.2.3")).reason == "prefix"


def test_a_refunded_global_token_can_be_used_again_but_not_beyond_the_burst() -> None:
    clock = FakeClock()
    limits = limiter(clock, global_per_second=0.001, global_burst=1, per_address_interval=60.0)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("198.51.100.1")).reason == "global"
    limits.refund_global()
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    limits.refund_global()
    limits.refund_global()  # a second refund does not lift the burst
    assert limits.check(ip("203.0.113.1")) == ALLOWED
    assert limits.check(ip("203.0.113.2")).reason == "global"
    # The per-address limit stays charged.
    limits.refund_global()
    assert limits.check(ip("192.0.2.1")).reason == "address"


def test_global_token_bucket_and_refill() -> None:
    clock = FakeClock()
    limits = limiter(clock, global_per_second=4.0, global_burst=2)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    assert limits.check(ip("203.0.113.1")) == RateDecision(False, "global", 0.25)
    clock.advance(0.125)
    assert limits.check(ip("203.0.113.1")) == RateDecision(False, "global", 0.125)
    clock.advance(0.125)
    assert limits.check(ip("203.0.113.1")) == ALLOWED
    assert limits.check(ip("203.0.113.2")) == RateDecision(False, "global", 0.25)
    clock.advance(3600)  # refills only up to the burst
    assert limits.check(ip("203.0.113.2")) == ALLOWED
    assert limits.check(ip("203.0.113.3")) == ALLOWED
    assert limits.check(ip("203.0.113.4")).reason == "global"


def test_the_longest_wait_is_reported() -> None:
    clock = FakeClock()
    limits = limiter(
        clock,
        per_address_interval=60.0,
        per_prefix=1,
        prefix_window=30.0,
        global_per_second=1.0,
        global_burst=1,
    )
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "address", 60.0)
    assert limits.check(ip("192.0.2.2")) == RateDecision(False, "prefix", 30.0)
    assert limits.check(ip("198.51.100.1")) == RateDecision(False, "global", 1.0)
    clock.advance(40)
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "address", 20.0)


def test_a_longer_prefix_wait_beats_the_address_wait() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=10.0, per_prefix=1, prefix_window=60.0)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("192.0.2.1")) == RateDecision(False, "prefix", 60.0)


def test_refusals_consume_nothing() -> None:
    clock = FakeClock()
    limits = limiter(
        clock, per_address_interval=1000.0, per_prefix=1, prefix_window=10.0, global_burst=2
    )
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    for _ in range(50):
        assert limits.check(ip("192.0.2.1")).reason == "address"
        assert limits.check(ip("192.0.2.2")).reason == "prefix"
    # Neither the refusals nor their addresses were counted.
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    assert limits.check(ip("203.0.113.1")).reason == "global"
    clock.advance(10)
    assert limits.check(ip("192.0.2.2")) == ALLOWED
    assert limits.check(ip("203.0.113.1")) == ALLOWED


def test_expired_entries_are_dropped() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=10.0, per_prefix=5, prefix_window=10.0)
    for host in range(1, 6):
        limits.check(ip(f"192.0.2.{host}"))
        limits.check(ip(f"2001:db8:{host}::1"))
    assert limits.tracked_keys == 10 + 1 + 5
    clock.advance(10)
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    assert limits.tracked_keys == 2


def test_memory_is_bounded_by_max_entries() -> None:
    clock = FakeClock()
    limits = limiter(
        clock, per_address_interval=1e9, prefix_window=1e9, per_prefix=1, max_entries=100_000
    )
    peak = 0
    for number in range(100_000):
        # Every address in a /24 (or /56) of its own: two new keys per test.
        address = IPv4Address(number << 8) if number % 2 else IPv6Address(number << 72)
        assert limits.check(address) == ALLOWED
        peak = max(peak, limits.tracked_keys)
    assert peak == limits.tracked_keys == 100_000


def test_the_oldest_entries_are_evicted_first() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=1e9, max_entries=4)
    for address in ("192.0.2.1", "198.51.100.1", "203.0.113.1"):
        assert limits.check(ip(address)) == ALLOWED
        clock.advance(1)
    assert limits.tracked_keys == 4
    assert limits.check(ip("203.0.113.1")).reason == "address"
    assert limits.check(ip("198.51.100.1")).reason == "address"
    assert limits.check(ip("192.0.2.1")) == ALLOWED  # forgotten: it was the oldest
    assert limits.check(ip("198.51.100.1")) == ALLOWED  # now the oldest, so forgotten
    assert limits.check(ip("192.0.2.1")).reason == "address"
    assert limits.tracked_keys == 4


def test_a_refreshed_entry_is_no_longer_the_oldest() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=1e9, per_prefix=2, max_entries=4)
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    assert limits.check(ip("198.51.100.1")) == ALLOWED
    assert limits.check(ip("192.0.2.2")) == ALLOWED  # refreshes 192.0.2.0/24
    assert limits.check(ip("203.0.113.1")) == ALLOWED  # evicts 198.51.100.1 and its /24
    assert limits.check(ip("192.0.2.3")).reason == "prefix"
    assert limits.check(ip("198.51.100.1")) == ALLOWED


def test_expired_entries_go_before_live_ones() -> None:
    clock = FakeClock()
    limits = limiter(clock, per_address_interval=10.0, prefix_window=10.0, max_entries=4)
    limits.check(ip("192.0.2.1"))
    clock.advance(5)
    limits.check(ip("198.51.100.1"))
    clock.advance(5)
    assert limits.check(ip("203.0.113.1")) == ALLOWED
    assert limits.check(ip("198.51.100.1")) == RateDecision(False, "address", 5.0)


@pytest.mark.parametrize(
    "options",
    [
        {"per_address_interval": -1.0},
        {"prefix_window": -1.0},
        {"per_prefix": 0},
        {"ipv4_prefix": 33},
        {"ipv6_prefix": -1},
        {"global_per_second": 0.0},
        {"global_burst": 0},
        {"max_entries": 1},
    ],
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        RateLimiter(**options)


def test_defaults_use_the_monotonic_clock() -> None:
    limits = RateLimiter()
    assert limits.check(ip("192.0.2.1")) == ALLOWED
    decision = limits.check(ip("192.0.2.1"))
    assert decision.reason == "address"
    assert 59 < decision.retry_after <= 60


POOL = [
    "192.0.2.1",
    "::ffff:192.0.2.1",
    "192.0.2.2",
    "198.51.100.1",
    "2001:db8::1",
    "2001:db8:0:1::1",
    "2001:db8:1::1",
]
steps = st.lists(
    st.tuples(
        st.sampled_from(POOL),
        st.one_of(
            st.sampled_from([0.0, 0.5, 15.0, 30.0]),
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
    ),
    max_size=60,
)


@given(steps)
def test_never_two_tests_from_one_address_within_the_interval(
    sequence: list[tuple[str, float]],
) -> None:
    clock = FakeClock()
    interval = 30.0
    limits = RateLimiter(
        per_address_interval=interval,
        per_prefix=3,
        prefix_window=45.0,
        global_per_second=0.5,
        global_burst=3,
        clock=clock,
    )
    last_test: dict[IPAddress, float] = {}
    for text, advance in sequence:
        clock.advance(advance)
        address = unmap_ipv4(ip(text))
        decision = limits.check(ip(text))
        previous = last_test.get(address)
        if decision.allowed:
            assert decision == ALLOWED
            assert previous is None or clock.now - previous >= interval
            last_test[address] = clock.now
        else:
            assert decision.retry_after > 0
            if previous is not None and clock.now - previous < interval:
                assert decision.retry_after >= interval - (clock.now - previous)


@given(
    st.lists(
        st.tuples(st.ip_addresses(), st.floats(min_value=0, max_value=5, allow_nan=False)),
        max_size=80,
    )
)
def test_tracked_keys_never_exceed_the_cap(sequence: list[tuple[IPAddress, float]]) -> None:
    clock = FakeClock()
    limits = RateLimiter(max_entries=6, global_per_second=100.0, clock=clock)
    for address, advance in sequence:
        clock.advance(advance)
        limits.check(address)
        assert limits.tracked_keys <= 6
