"""Canary tokens: proof that a tested server really relayed a test message.

Each accepted probe sends its test message to `nobody-<token>@<test domain>`; the test domain's
MX is relayprobe's own sink, which marks the token arrived in a registry the running test waits
on. The registry's methods are async, for a backend shared by several replicas
(`redisregistry.RedisRegistry`); everything here is pure except `InMemoryRegistry.wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import re
import secrets
import string
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relayprobe.relaytest.sanitize import sanitize_text

# base32's alphabet in lowercase: no 0, 1 or 8 to mistake for o, l or b in a transcript.
TOKEN_ALPHABET = string.ascii_lowercase + "234567"
TOKEN_LENGTH = 10  # 50 bits: unguessable within a test's few minutes, short in a transcript
LOCAL_PART_PREFIX = "nobody-"

# re.ASCII: under IGNORECASE alone, [a-z] would also match the Kelvin sign and the long s.
_LOCAL_PART = re.compile(
    rf"{LOCAL_PART_PREFIX}([{TOKEN_ALPHABET}]{{{TOKEN_LENGTH}}})", re.IGNORECASE | re.ASCII
)
# RFC 5321 4.5.3.1.3: no path is longer; nothing longer is worth parsing.
MAX_ADDRESS_CHARS = 256
# A header or body value from the network or the probe table is cut to this many characters.
MAX_VALUE_CHARS = 200
# 128 bits of an HMAC-SHA256: a message's secret can be neither guessed nor forged.
SECRET_HEX_CHARS = 32


def new_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def local_part(token: str) -> str:
    return f"{LOCAL_PART_PREFIX}{token}"


def _normal_domain(domain: str) -> str:
    return domain.removesuffix(".").lower()


def token_from_address(address: bytes | str, *, domain: str) -> str | None:
    """The token in `nobody-<token>@<domain>` (angle brackets and a trailing dot allowed).

    Case is ignored throughout: some gateways fold the case of the addresses they pass on.
    """
    if isinstance(address, bytes):
        try:
            text = address.decode("ascii")
        except UnicodeDecodeError:
            return None
    else:
        text = address
    if len(text) > MAX_ADDRESS_CHARS or not text.isascii():
        return None
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, address_domain = text.rpartition("@")
    wanted_domain = _normal_domain(domain)
    if not at or not wanted_domain or _normal_domain(address_domain) != wanted_domain:
        return None
    match = _LOCAL_PART.fullmatch(local)
    return match.group(1).lower() if match else None


def _header_safe(text: str) -> str:
    """One line of printable ASCII: no CR or LF can start a header of the sender's choosing."""
    safe = sanitize_text(text).encode("ascii", "backslashreplace").decode("ascii")
    return safe if len(safe) <= MAX_VALUE_CHARS else f"{safe[:MAX_VALUE_CHARS]}..."


def test_message(
    *,
    token: str,
    secret: str,
    probe_name: str,
    sender: str,
    recipient: str,
    operator: str,
    tested_host: str,
    now: datetime,
) -> bytes:
    """The test message of one accepted probe, with CRLF line ends and without dot-stuffing.

    `secret` is the token's `message_secret`: only a message that went through the tested server
    carries it, so the caller, who sees the token, cannot deliver one itself. `sender` and
    `recipient` are the envelope addresses as the probe sent them; `now` must be timezone-aware.
    """
    probe, host, by = (_header_safe(value) for value in (probe_name, tested_host, operator))
    mail_from, rcpt_to = _header_safe(sender), _header_safe(recipient)
    lines = [
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <{token}.{int(now.timestamp())}@relayprobe.invalid>",
        f"From: {mail_from}",
        f"To: {rcpt_to}",
        f"Subject: relayprobe relay test {token} ({probe})",
        f"X-Relayprobe-Token: {token}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is a test message from relayprobe, an open-relay tester.",
        "It was sent during an open-relay test of this mail server:",
        f"  {host}",
        "run at the request of the server's administrator by:",
        f"  {by}",
        "",
        f"Probe: {probe}",
        f"Envelope sender: {mail_from}",
        f"Envelope recipient: {rcpt_to}",
        f"Token: {token}",
        f"Check: {secret}",
        "",
        "If this message reached you, the server accepted it for a third party.",
        "Nobody reads it; it can be deleted.",
    ]
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")


ArrivalCallback = Callable[[str, float, str], None]
"""`on_arrival(token, seconds since register, address that delivered the message)`; the seconds
are wall-clock time, which means the same on every replica."""


class CanaryRegistry(Protocol):
    """Pending and arrived tokens: the seam for a backend shared by several replicas.

    Every method may raise `RegistryUnavailable` when a shared backend cannot be reached or
    answers too slowly; `InMemoryRegistry` never does.
    """

    async def register(self, token: str, *, ttl: float) -> str:
        """Hold `token` as pending for `ttl` seconds, from now by the wall clock; return its
        `message_secret`. Raises `RegistryFull` when no more tokens may be pending."""
        ...

    async def is_pending(self, token: str) -> bool: ...

    async def message_secret(self, token: str) -> str | None:
        """What the test message for `token` carries in its body to prove it went through the
        tested server: never shown to the caller, the same in every replica. None when the
        registry has no secret for `token`."""
        ...

    async def mark_arrived(self, token: str, *, source: str) -> bool:
        """Record an arrival delivered from address `source`; True only the first time, for a
        pending token."""
        ...

    async def wait(
        self, tokens: Collection[str], *, timeout: float, on_arrival: ArrivalCallback
    ) -> set[str]:
        """The tokens that arrived, including before the call; returns once all have or at
        `timeout`. `on_arrival` is called for each as it comes."""
        ...

    async def forget(self, tokens: Collection[str]) -> None: ...


class RegistryFull(RuntimeError):
    """More unexpired tokens than the registry may hold."""


class RegistryUnavailable(ConnectionError):
    """A shared registry could not be reached, or did not answer in time."""


@dataclass(slots=True)
class _Entry:
    registered_at: float
    expires_at: float
    arrived_at: float | None = None
    arrived_from: str = ""


class InMemoryRegistry:
    """A `CanaryRegistry` for one process. Expired tokens are neither pending nor kept."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_entries: int = 100_000
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, not {max_entries}")
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        # Per registry, not per token: the secrets need no storage, and die with the tokens.
        self._secret_key = secrets.token_bytes(32)
        self._waiters: list[tuple[frozenset[str], asyncio.Queue[str]]] = []

    def __len__(self) -> int:
        return len(self._entries)

    async def register(self, token: str, *, ttl: float) -> str:
        now = self._clock()
        if token not in self._entries and len(self._entries) >= self._max_entries:
            self._purge_expired(now)
            if len(self._entries) >= self._max_entries:
                raise RegistryFull(f"{len(self._entries)} canary tokens pending")
        self._entries[token] = _Entry(registered_at=now, expires_at=now + ttl)
        return await self.message_secret(token)

    async def is_pending(self, token: str) -> bool:
        entry = self._live_entry(token)
        return entry is not None and entry.arrived_at is None

    async def message_secret(self, token: str) -> str:
        digest = hmac.new(self._secret_key, token.encode(), hashlib.sha256).hexdigest()
        return digest[:SECRET_HEX_CHARS]

    async def mark_arrived(self, token: str, *, source: str) -> bool:
        entry = self._live_entry(token)
        if entry is None or entry.arrived_at is not None:
            return False
        entry.arrived_at = self._clock()
        entry.arrived_from = source
        for tokens, arrivals in self._waiters:
            if token in tokens:
                arrivals.put_nowait(token)
        return True

    async def wait(
        self, tokens: Collection[str], *, timeout: float, on_arrival: ArrivalCallback
    ) -> set[str]:
        wanted = frozenset(tokens)
        arrived: set[str] = set()
        arrivals: asyncio.Queue[str] = asyncio.Queue()
        waiter = (wanted, arrivals)
        # Listen before looking back: no arrival can slip between the two.
        self._waiters.append(waiter)
        try:
            for token in tokens:  # in the caller's order: earlier arrivals are reported so
                if self._arrival(token) is not None:
                    arrivals.put_nowait(token)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while arrived != wanted:
                        token = await arrivals.get()
                        arrival = self._arrival(token)
                        if token in arrived or arrival is None:
                            continue
                        arrived.add(token)
                        on_arrival(token, *arrival)
        finally:
            self._waiters.remove(waiter)
        return arrived

    async def forget(self, tokens: Collection[str]) -> None:
        for token in tokens:
            self._entries.pop(token, None)

    def _arrival(self, token: str) -> tuple[float, str] | None:
        """Seconds from register to arrival, and the address that delivered it."""
        entry = self._entries.get(token)
        if entry is None or entry.arrived_at is None:
            return None
        return entry.arrived_at - entry.registered_at, entry.arrived_from

    def _live_entry(self, token: str) -> _Entry | None:
        entry = self._entries.get(token)
        if entry is not None and entry.expires_at <= self._clock():
            del self._entries[token]
            return None
        return entry

    def _purge_expired(self, now: float) -> None:
        expired = [token for token, entry in self._entries.items() if entry.expires_at <= now]
        for token in expired:
            del self._entries[token]
