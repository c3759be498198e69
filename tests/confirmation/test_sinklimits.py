import dataclasses
from ipaddress import ip_address

import pytest

from relayprobe.confirmation.sinklimits import Admitted, Refusal, SinkGuard, SinkLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(clock: FakeClock | None = None, **limits: int | float) -> SinkGuard[str]:
    return SinkGuard(SinkLimits(**limits), clock=clock or FakeClock())


def admit(sink: SinkGuard[str], key: str, address: str) -> Refusal | None:
    """Admit connection `key`, which must evict nobody: the refusal, or None."""
    admission = sink.admit(key, ip_address(address))
    if isinstance(admission, str):
        return admission
    assert admission.evicted is None
    return None


def test_per_address_and_per_prefix_caps() -> None:
    sink = guard(max_connections_per_address=2, max_connections_per_prefix=3)
    one, other = "192.0.2.1", "192.0.2.2"
    assert [admit(sink, f"one{n}", one) for n in range(3)] == [None, None, "address"]
    assert [admit(sink, f"other{n}", other) for n in range(2)] == [None, "prefix"]
    # IPv4-mapped IPv6 is the same address.
    assert admit(sink, "mapped", "::ffff:192.0.2.1") == "address"
    assert admit(sink, "elsewhere", "198.51.100.1") is None
    sink.release("one0")
    sink.release("one0")  # once only
    sink.release("refused: never admitted")
    assert admit(sink, "other1", other) is None
    assert sink.connections == 4


def test_ipv6_prefix_is_a_48() -> None:
    sink = guard(max_connections_per_prefix=1)
    assert admit(sink, "a", "2001:db8:1:1::1") is None
    assert admit(sink, "b", "2001:db8:1:2::1") == "prefix"
    assert admit(sink, "c", "2001:db8:2::1") is None


def test_the_reserve_is_for_prefixes_holding_nothing() -> None:
    sink = guard(max_connections=4, reserved_connections=2, max_connections_per_prefix=4)
    assert [admit(sink, f"crowd{n}", f"192.0.2.{n}") for n in range(1, 4)] == [
        None,
        None,
        "capacity",
    ]
    assert admit(sink, "new", "198.51.100.1") is None
    assert admit(sink, "newer", "203.0.113.1") is None
    assert sink.connections == 4


def test_a_full_sink_evicts_the_oldest_idle_connection_of_the_most_crowded_prefix() -> None:
    """Finding 5: idle connections from enough prefixes once held the sink full."""
    sink = guard(max_connections=5, reserved_connections=1, max_connections_per_prefix=3)
    for key, address in [
        ("lone", "198.51.100.1"),
        ("crowd1", "192.0.2.1"),
        ("crowd2", "192.0.2.2"),
        ("crowd3", "192.0.2.3"),
        ("pair1", "203.0.113.1"),
    ]:
        assert admit(sink, key, address) is None
    sink.delivering("crowd1")
    # A new prefix: the oldest idle connection of the prefix holding most goes.
    assert sink.admit("relay", ip_address("100.64.0.1")) == Admitted("crowd2")
    assert sink.connections == 5
    sink.release("crowd2")  # its close, later: already counted out
    assert sink.connections == 5
    # A prefix holding one may evict from one holding two, not from one holding one.
    assert sink.admit("pair2", ip_address("203.0.113.2")) == Admitted("crowd3")
    assert admit(sink, "pair3", "203.0.113.3") == "capacity"
    assert sink.admit("lone2", ip_address("198.51.100.2")) == Admitted("pair1")


def test_a_sink_full_of_delivering_connections_refuses() -> None:
    sink = guard(max_connections=2, reserved_connections=1)
    for key, address in [("a", "192.0.2.1"), ("b", "198.51.100.1")]:
        assert admit(sink, key, address) is None
        sink.delivering(key)
    assert admit(sink, "c", "203.0.113.1") == "capacity"
    sink.release("a")
    assert admit(sink, "c", "203.0.113.1") is None


def test_unknown_recipients_throttle_a_prefix_until_its_budget_refills() -> None:
    clock = FakeClock()
    sink = guard(clock, unknown_recipients_per_minute=6)
    flooder = ip_address("192.0.2.1")
    assert [sink.unknown_recipient(flooder) for _ in range(7)] == [True] * 6 + [False]
    assert sink.throttled(ip_address("192.0.2.99"))
    assert not sink.unknown_recipient(ip_address("192.0.2.99"))
    assert not sink.throttled(ip_address("198.51.100.1"))
    clock.now += 10  # 6 a minute: one back
    assert sink.unknown_recipient(flooder)
    assert not sink.unknown_recipient(flooder)


def test_a_throttled_prefix_still_connects() -> None:
    """Finding 4: a neighbour spending the /24's budget once kept a relay in it out."""
    sink = guard(unknown_recipients_per_minute=3)
    assert [sink.unknown_recipient(ip_address("192.0.2.77")) for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert sink.throttled(ip_address("192.0.2.1"))
    assert admit(sink, "relay", "192.0.2.1") is None


def test_message_bytes_are_paced_per_prefix() -> None:
    """Finding 1: a stream of DATA once took whatever the sink could read."""
    clock = FakeClock()
    sink = guard(clock, message_bytes_per_second=1000)
    streamer, neighbour = ip_address("192.0.2.1"), ip_address("192.0.2.2")
    assert sink.message_delay(streamer, 1000) == 0.0  # a second's worth at once
    assert sink.message_delay(streamer, 500) == pytest.approx(0.5)
    assert sink.message_delay(neighbour, 500) == pytest.approx(1.0)
    assert sink.message_delay(ip_address("198.51.100.1"), 1000) == 0.0
    clock.now += 1.0
    assert sink.message_delay(streamer, 0) == 0.0
    assert sink.message_delay(streamer, 1000) == pytest.approx(1.0)


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
