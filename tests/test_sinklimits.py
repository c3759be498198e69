import dataclasses
from ipaddress import ip_address

import pytest

from relayprobe.sinklimits import SinkGuard, SinkLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(clock: FakeClock | None = None, **limits: int | float) -> SinkGuard:
    return SinkGuard(SinkLimits(**limits), clock=clock or FakeClock())


def test_per_address_and_per_prefix_caps() -> None:
    sink = guard(max_connections_per_address=2, max_connections_per_prefix=3)
    one, other = ip_address("192.0.2.1"), ip_address("192.0.2.2")
    assert [sink.admit(one) for _ in range(3)] == [None, None, "address"]
    assert [sink.admit(other) for _ in range(2)] == [None, "prefix"]
    # IPv4-mapped IPv6 is the same address.
    assert sink.admit(ip_address("::ffff:192.0.2.1")) == "address"
    assert sink.admit(ip_address("198.51.100.1")) is None
    sink.release(one)
    assert sink.admit(other) is None
    assert sink.connections == 4


def test_ipv6_prefix_is_a_48() -> None:
    sink = guard(max_connections_per_prefix=1)
    assert sink.admit(ip_address("2001:db8:1:1::1")) is None
    assert sink.admit(ip_address("2001:db8:1:2::1")) == "prefix"
    assert sink.admit(ip_address("2001:db8:2::1")) is None


def test_the_reserve_is_for_prefixes_holding_nothing() -> None:
    sink = guard(max_connections=4, reserved_connections=2, max_connections_per_prefix=4)
    assert [sink.admit(ip_address(f"192.0.2.{n}")) for n in range(1, 4)] == [
        None,
        None,
        "capacity",
    ]
    assert sink.admit(ip_address("198.51.100.1")) is None
    assert sink.admit(ip_address("203.0.113.1")) is None
    assert sink.admit(ip_address("100.64.0.1")) == "capacity"


def test_unknown_recipients_throttle_a_prefix_until_its_budget_refills() -> None:
    clock = FakeClock()
    sink = guard(clock, unknown_recipients_per_minute=6)
    flooder = ip_address("192.0.2.1")
    assert [sink.unknown_recipient(flooder) for _ in range(7)] == [True] * 6 + [False]
    assert sink.throttled(ip_address("192.0.2.99"))
    assert sink.admit(ip_address("192.0.2.99")) == "throttled"
    assert sink.admit(ip_address("198.51.100.1")) is None
    clock.now += 10  # 6 a minute: one back
    assert sink.admit(flooder) is None
    assert sink.unknown_recipient(flooder)
    assert not sink.unknown_recipient(flooder)


def test_replies_beyond_the_rate_wait_their_turn() -> None:
    clock = FakeClock()
    sink = guard(clock, replies_per_second=10)
    assert [sink.reply_delay() for _ in range(10)] == [0.0] * 10
    assert sink.reply_delay() == pytest.approx(0.1)
    assert sink.reply_delay() == pytest.approx(0.2)
    clock.now += 1  # the debt of 2 is paid, and 8 of a second's 10 are back
    assert [sink.reply_delay() for _ in range(8)] == [0.0] * 8
    assert sink.reply_delay() == pytest.approx(0.1)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(SinkLimits)])
def test_every_limit_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SinkLimits(**{name: 0})


def test_limits_that_contradict_each_other() -> None:
    with pytest.raises(ValueError, match="reserved_connections"):
        SinkLimits(max_connections=10, reserved_connections=10)
    with pytest.raises(ValueError, match="ipv4_prefix"):
        SinkLimits(ipv4_prefix=33)
