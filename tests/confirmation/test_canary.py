import asyncio
import email.parser
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

# The module, not its `test_message`: pytest would collect that name as a test.
from relayprobe.confirmation import canary
from relayprobe.confirmation.canary import (
    TOKEN_ALPHABET,
    TOKEN_LENGTH,
    InMemoryRegistry,
    RegistryFull,
    local_part,
    new_token,
    token_from_address,
)

DOMAIN = "relaytest.example"
TOKEN = "k3x7q2ab7z"
SECRET = "0123456789abcdef0123456789abcdef"
SOURCE = "192.0.2.25"

tokens = st.text(alphabet=TOKEN_ALPHABET, min_size=TOKEN_LENGTH, max_size=TOKEN_LENGTH)
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_new_token_is_short_lowercase_and_unpredictable() -> None:
    made = [new_token() for _ in range(2000)]
    assert all(len(token) == TOKEN_LENGTH for token in made)
    assert all(set(token) <= set(TOKEN_ALPHABET) for token in made)
    assert len(set(made)) == len(made)
    # Every symbol of the alphabet turns up: the tokens use all 50 bits.
    assert set("".join(made)) == set(TOKEN_ALPHABET)


def test_local_part() -> None:
    assert local_part(TOKEN) == "nobody-k3x7q2ab7z"
    assert set(TOKEN) <= set(TOKEN_ALPHABET)


@given(token=tokens, domain=domains)
def test_token_round_trips_through_the_address(token: str, domain: str) -> None:
    address = f"{local_part(token)}@{domain}"
    assert token_from_address(address, domain=domain) == token
    assert token_from_address(address.encode(), domain=domain) == token
    assert token_from_address(f"<{address}>", domain=domain) == token
    assert token_from_address(f"{address}.", domain=domain) == token
    assert token_from_address(address.upper(), domain=f"{domain}.") == token


@given(token=tokens, domain=domains, other=domains)
def test_token_of_another_domain_is_none(token: str, domain: str, other: str) -> None:
    address = f"{local_part(token)}@{other}"
    expected = token if other == domain else None
    assert token_from_address(address, domain=domain) == expected


@pytest.mark.parametrize(
    "address",
    [
        f"nobody-{TOKEN}@mx.{DOMAIN}",
        f"nobody-{TOKEN}@{DOMAIN}@mx.example.com",
        f'"nobody-{TOKEN}@{DOMAIN}"',
        f'<"nobody-{TOKEN}"@{DOMAIN}>',
        f"<@mx.example.com:nobody-{TOKEN}@{DOMAIN}>",
        f"nobody-{TOKEN}%{DOMAIN}@mx.example.com",
        f"{DOMAIN}!nobody-{TOKEN}",
        f"<nobody-{TOKEN}@{DOMAIN}",
        f"nobody-{TOKEN}@{DOMAIN}>",
        f"<<nobody-{TOKEN}@{DOMAIN}>>",
        f"nobody-{TOKEN}",
        f"nobody-{TOKEN}@",
        f"nobody{TOKEN}@{DOMAIN}",
        f"somebody-{TOKEN}@{DOMAIN}",
        f"nobody-{TOKEN}x@{DOMAIN}",
        f"nobody-{TOKEN[:-1]}@{DOMAIN}",
        f"nobody-k3x7q2ab70@{DOMAIN}",  # 0 is not in base32
        f"nobody-{TOKEN} @{DOMAIN}",
        f"nobody-{TOKEN}@{DOMAIN}..",
        f"nobody-{TOKEN.replace('k', chr(0x212A))}@{DOMAIN}",  # the Kelvin sign folds to k
        f"nobody-{TOKEN}@{DOMAIN}\r\n",
        "",
        "<>",
    ],
)
def test_anything_but_the_canary_address_is_none(address: str) -> None:
    assert token_from_address(f"nobody-{TOKEN}@{DOMAIN}", domain=DOMAIN) == TOKEN
    assert token_from_address(address, domain=DOMAIN) is None


def test_undecodable_or_huge_address_is_none() -> None:
    undecodable = f"nobody-{TOKEN}@{DOMAIN}\xff".encode("latin-1")
    assert token_from_address(undecodable, domain=DOMAIN) is None
    long_domain = f"{'a.' * 200}{DOMAIN}"
    assert token_from_address(f"nobody-{TOKEN}@{long_domain}", domain=long_domain) is None


def test_an_empty_test_domain_matches_nothing() -> None:
    assert token_from_address(f"nobody-{TOKEN}@", domain="") is None
    assert token_from_address(f"nobody-{TOKEN}@.", domain=".") is None


def make_message(**overrides: str) -> bytes:
    values = {
        "token": TOKEN,
        "secret": SECRET,
        "probe_name": "Test 8",
        "sender": "<spamtest@mail.example.com>",
        "recipient": f"<nobody-{TOKEN}%{DOMAIN}@mail.example.com>",
        "operator": "ISP Example, abuse@isp.example",
        "tested_host": "mail.example.com",
    } | overrides
    now = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    return canary.test_message(now=now, **values)


def test_message_headers_and_body() -> None:
    raw = make_message()
    assert raw.isascii()
    assert raw.replace(b"\r\n", b"").count(b"\n") == 0
    assert raw.replace(b"\r\n", b"").count(b"\r") == 0
    assert raw.endswith(b"\r\n")
    message = email.parser.BytesParser(policy=email.policy.SMTP).parsebytes(raw)
    assert message["Date"] == "Mon, 06 May 2024 07:08:09 +0000"
    assert message["Message-ID"] == f"<{TOKEN}.1714979289@relayprobe.invalid>"
    assert b"\r\nFrom: <spamtest@mail.example.com>\r\n" in raw
    assert f"\r\nTo: <nobody-{TOKEN}%{DOMAIN}@mail.example.com>\r\n".encode() in raw
    assert message["Subject"] == f"relayprobe relay test {TOKEN} (Test 8)"
    assert message["X-Relayprobe-Token"] == TOKEN
    body = message.get_content()
    assert "open-relay test" in body
    assert "at the request of the server's administrator by" in body
    assert "ISP Example, abuse@isp.example" in body
    assert "mail.example.com" in body
    assert "can be deleted" in body
    assert f"\r\nCheck: {SECRET}\r\n".encode() in raw


def test_message_values_cannot_add_headers_or_break_ascii() -> None:
    raw = make_message(
        tested_host="evil.example\r\nBcc: victim@example.org\r\n\r\nspam",
        probe_name="Test \x1b[2J 8",
        operator="Ïśþ Éxample",
    )
    assert raw.isascii()
    message = email.parser.BytesParser(policy=email.policy.SMTP).parsebytes(raw)
    assert message["Bcc"] is None
    assert message["Subject"] == f"relayprobe relay test {TOKEN} (Test \\x1b[2J 8)"
    assert "evil.example\\x0d\\x0aBcc: victim@example.org" in message.get_content()
    assert "\\xcf\\u015b\\xfe \\xc9xample" in message.get_content()


def test_message_lines_stay_short_with_long_values() -> None:
    raw = make_message(tested_host="h" * 5000, recipient="<" + "r" * 5000 + ">")
    assert max(len(line) for line in raw.split(b"\r\n")) < 300


async def test_registered_token_is_pending_until_it_arrives_once() -> None:
    registry = InMemoryRegistry()
    assert not await registry.is_pending(TOKEN)
    await registry.register(TOKEN, ttl=60)
    assert await registry.is_pending(TOKEN)
    assert await registry.mark_arrived(TOKEN, source=SOURCE)
    assert not await registry.is_pending(TOKEN)
    assert not await registry.mark_arrived(TOKEN, source=SOURCE)
    assert not await registry.mark_arrived("unknown000", source=SOURCE)


async def test_tokens_expire_after_their_ttl() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    await registry.register("shortlived", ttl=10)
    await registry.register("longlived0", ttl=100)
    clock.now += 9.9
    assert await registry.is_pending("shortlived")
    clock.now += 0.1
    assert not await registry.is_pending("shortlived")
    assert not await registry.mark_arrived("shortlived", source=SOURCE)
    assert await registry.is_pending("longlived0")
    assert len(registry) == 1


async def test_forget_drops_tokens() -> None:
    registry = InMemoryRegistry()
    await registry.register("aaaaaaaaaa", ttl=60)
    await registry.register("bbbbbbbbbb", ttl=60)
    await registry.forget(["aaaaaaaaaa", "cccccccccc"])
    assert not await registry.is_pending("aaaaaaaaaa")
    assert await registry.is_pending("bbbbbbbbbb")
    assert len(registry) == 1


async def test_registry_is_bounded_and_purges_expired_tokens_when_full() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock, max_entries=3)
    for token in ("aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"):
        await registry.register(token, ttl=10)
    with pytest.raises(RegistryFull):
        await registry.register("dddddddddd", ttl=10)
    await registry.register("aaaaaaaaaa", ttl=20)  # renewing a token takes no room
    clock.now += 10
    await registry.register("dddddddddd", ttl=10)
    assert len(registry) == 2
    assert await registry.is_pending("aaaaaaaaaa")
    assert await registry.is_pending("dddddddddd")


def test_registry_rejects_a_useless_cap() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryRegistry(max_entries=0)


async def test_wait_reports_earlier_and_live_arrivals() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    for token in ("early00000", "late000000"):
        await registry.register(token, ttl=60)
    clock.now += 1.5
    await registry.mark_arrived("early00000", source="192.0.2.1")
    seen: list[tuple[str, float, str]] = []

    async def arrive_later() -> None:
        await asyncio.sleep(0.01)
        clock.now += 2.0
        await registry.mark_arrived("late000000", source="2001:db8::2")

    arriving = asyncio.create_task(arrive_later())
    arrived = await registry.wait(
        ["early00000", "late000000"],
        timeout=5,
        on_arrival=lambda token, after_s, source: seen.append((token, after_s, source)),
    )
    await arriving
    assert arrived == {"early00000", "late000000"}
    assert seen == [("early00000", 1.5, "192.0.2.1"), ("late000000", 3.5, "2001:db8::2")]


async def test_wait_returns_the_partial_set_at_the_timeout() -> None:
    registry = InMemoryRegistry()
    for token in ("arrives000", "neverarriv"):
        await registry.register(token, ttl=60)
    await registry.mark_arrived("arrives000", source=SOURCE)
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrived = await registry.wait(
        ["arrives000", "neverarriv"],
        timeout=0.1,
        on_arrival=lambda token, after_s, source: seen.append(token),
    )
    assert 0.1 <= loop.time() - started < 2
    assert arrived == {"arrives000"}
    assert seen == ["arrives000"]


async def test_several_waiters_see_the_same_arrival() -> None:
    registry = InMemoryRegistry()
    await registry.register("shared0000", ttl=60)
    waiters = [
        asyncio.create_task(
            registry.wait(["shared0000"], timeout=5, on_arrival=lambda token, after_s, source: None)
        )
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    await registry.mark_arrived("shared0000", source=SOURCE)
    assert await asyncio.gather(*waiters) == [{"shared0000"}] * 3


async def test_wait_ignores_arrivals_of_other_tokens() -> None:
    registry = InMemoryRegistry()
    await registry.register("mine000000", ttl=60)
    await registry.register("theirs0000", ttl=60)
    waiting = asyncio.create_task(
        registry.wait(["mine000000"], timeout=0.1, on_arrival=lambda token, after_s, source: None)
    )
    await asyncio.sleep(0)
    await registry.mark_arrived("theirs0000", source=SOURCE)
    assert await waiting == set()


async def test_message_secrets_are_unforgeable_without_the_registry() -> None:
    registry, other = InMemoryRegistry(), InMemoryRegistry()
    secret = await registry.message_secret(TOKEN)
    assert len(secret) == 32 and set(secret) <= set("0123456789abcdef")
    # Stable for a token, so the sink can check it without storing it...
    assert await registry.message_secret(TOKEN) == secret
    # ...but different for every token and under every registry's key.
    assert await registry.message_secret("m4n5p6q7r2") != secret
    assert await other.message_secret(TOKEN) != secret
    assert TOKEN not in secret
