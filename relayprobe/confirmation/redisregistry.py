"""A `CanaryRegistry` on Redis (or Valkey), shared by every replica of the service.

Each token is a hash with a TTL: its wall-clock registration time, its secret, and the channel of
the registry instance that registered it. Marking an arrival is one Lua script: only the first
arrival of a pending token counts, and it is published on that channel, so that the replica
running the test hears of it at once, whichever replica's sink received the message. Each
instance listens on its own channel with one connection; a waiter looks back at its tokens
whenever that subscription is (re)made, and polls while it is not, so that no arrival is missed.

Every Redis call is bounded by `timeout_s`. A call that fails or is slow raises
`RegistryUnavailable`, is counted through `on_unavailable`, and leaves the registry unhealthy
(`last_error`) until a call succeeds; redis-py reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeAlias, TypeVar

import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from relayprobe.confirmation.canary import SECRET_HEX_CHARS, ArrivalCallback, RegistryUnavailable
from relayprobe.storage import redisclient

T = TypeVar("T")

# The listener retries this often while Redis is away, and waiters poll as often meanwhile.
RETRY_S = 0.5
# A quiet subscription is asked for a PING this often; one unanswered means the link is dead.
HEARTBEAT_S = 5.0
_HEX = frozenset(b"0123456789abcdef")
_ARRIVAL_FIELDS = ("registered_at", "arrived_at", "source")

# KEYS[1]: the token's hash. ARGV: arrival time, source address, token.
_MARK_ARRIVED = """
local entry = redis.call('HMGET', KEYS[1], 'registered_at', 'arrived_at', 'channel')
if not entry[1] or entry[2] then
    return 0
end
redis.call('HSET', KEYS[1], 'arrived_at', ARGV[1], 'source', ARGV[2])
redis.call('PUBLISH', entry[3], ARGV[3])
return 1
"""

log = structlog.get_logger()

_Wakes: TypeAlias = asyncio.Queue[str | None]
"""A waiter's queue: a token that arrived, or None to look back at every token."""


def _arrival(fields: list[bytes | None]) -> tuple[float, str] | None:
    """Seconds from register to arrival and the delivering address, from a token's hash; None
    unless it arrived. Nothing in Redis is trusted to be well-formed."""
    registered, arrived, source = fields
    if registered is None or arrived is None or source is None:
        return None
    try:
        after = float(arrived) - float(registered)
        address = ipaddress.ip_address(source.decode("ascii"))
    except ValueError:
        return None
    if not math.isfinite(after):
        return None
    # Replicas' clocks may differ by a little: never a negative time.
    return max(after, 0.0), str(address)


class RedisRegistry:
    """Tokens, secrets and arrivals in Redis: one instance per replica, all on one Redis.

    `start()` before use (it subscribes to this instance's arrivals), `aclose()` after.
    `on_unavailable(operation)` is called for each failed or slow call, with the operation's
    name (`register`, `is_pending`, `message_secret`, `mark_arrived`, `wait`, `forget`,
    `listen`): a metric's label.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.2,
        key_prefix: str = "relayprobe:",
        max_connections: int = 50,
        on_unavailable: Callable[[str], None] | None = None,
    ) -> None:
        """`url`: `redis://`, `rediss://` or `unix://`, as redis-py reads it; it may hold a
        password, and is never logged."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self._redis = redisclient.connect(url, timeout_s=timeout_s, max_connections=max_connections)
        self._mark_arrived = self._redis.register_script(_MARK_ARRIVED)
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._channel = f"{key_prefix}arrivals:{secrets.token_hex(8)}"
        self._on_unavailable = on_unavailable
        self._waiters: list[tuple[frozenset[str], _Wakes]] = []
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._error: str | None = None

    @property
    def last_error(self) -> str | None:
        """Why the registry is degraded, None when it is not: the last failure until a call
        succeeds, or that arrivals are not being heard."""
        if self._error is None and not self._subscribed.is_set():
            return "not subscribed to arrivals"
        return self._error

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    async def start(self) -> None:
        """Listen for this instance's arrivals. Returns once subscribed, or after `timeout_s`
        if Redis does not answer; the listener then keeps trying in the background."""
        if self._listener is not None:
            raise RuntimeError("the Redis registry is already started")
        self._listener = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await self._subscribed.wait()

    async def aclose(self) -> None:
        """Stop listening and close every connection."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(self._timeout_s):
                await self._redis.aclose()

    async def register(self, token: str, *, ttl: float) -> str:
        secret = secrets.token_hex(SECRET_HEX_CHARS // 2)
        entry = [
            *("registered_at", repr(time.time())),
            *("secret", secret),
            *("channel", self._channel),
        ]

        async def write() -> None:
            # One round trip: a token registered again starts afresh.
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key(token))
            pipe.hset(self._key(token), items=entry)
            pipe.pexpire(self._key(token), max(1, math.ceil(ttl * 1000)))
            await pipe.execute()

        await self._bounded("register", write())
        return secret

    async def is_pending(self, token: str) -> bool:
        registered, arrived = await self._bounded(
            "is_pending", self._redis.hmget(self._key(token), ["registered_at", "arrived_at"])
        )
        return registered is not None and arrived is None

    async def message_secret(self, token: str) -> str | None:
        secret = await self._bounded("message_secret", self._redis.hget(self._key(token), "secret"))
        if not isinstance(secret, bytes) or len(secret) != SECRET_HEX_CHARS:
            return None
        return secret.decode("ascii") if set(secret) <= _HEX else None

    async def mark_arrived(self, token: str, *, source: str) -> bool:
        marked = await self._bounded(
            "mark_arrived",
            self._mark_arrived(keys=[self._key(token)], args=[repr(time.time()), source, token]),
        )
        return bool(marked)

    async def wait(
        self, tokens: Collection[str], *, timeout: float, on_arrival: ArrivalCallback
    ) -> set[str]:
        """As `CanaryRegistry.wait`, for tokens this instance registered. Raises
        `RegistryUnavailable` when Redis cannot be reached at the start, or still cannot at the
        end; an outage in between is ridden out, and what arrived meanwhile is found after."""
        order = list(dict.fromkeys(tokens))  # the caller's order, for arrivals found together
        wanted = frozenset(order)
        arrived: set[str] = set()
        wakes: _Wakes = asyncio.Queue()
        waiter = (wanted, wakes)
        # Listen before looking back: no arrival can slip between the two.
        self._waiters.append(waiter)
        wakes.put_nowait(None)
        looked_back = False
        lost: RegistryUnavailable | None = None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while arrived != wanted:
                        woken = await self._next_wake(wakes, polling=lost is not None)
                        if woken is None:
                            looking = [token for token in order if token not in arrived]
                        elif woken not in arrived:
                            looking = [woken]
                        else:
                            continue
                        try:
                            found = await self._arrivals(looking)
                        except RegistryUnavailable as exc:
                            if not looked_back:
                                raise  # away from the start: there is nothing to wait on
                            lost = exc
                            continue
                        looked_back, lost = True, None
                        for token, (after_s, source) in found:
                            arrived.add(token)
                            on_arrival(token, after_s, source)
            if lost is not None:
                raise lost
        finally:
            self._waiters.remove(waiter)
        return arrived

    async def forget(self, tokens: Collection[str]) -> None:
        if tokens:
            await self._bounded("forget", self._redis.delete(*map(self._key, tokens)))

    def _key(self, token: str) -> str:
        return f"{self._prefix}canary:{token}"

    async def _bounded(self, operation: str, call: Awaitable[T]) -> T:
        """`call`, within `timeout_s`; a failure or a timeout is `RegistryUnavailable`."""
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call
        except (TimeoutError, RedisError, OSError) as exc:
            raise self._failed(operation, exc) from None
        self._succeeded()
        return result

    def _failed(self, operation: str, error: BaseException) -> RegistryUnavailable:
        reason = f"{operation}: {redisclient.failure_reason(error, timeout_s=self._timeout_s)}"
        if self._error is None:
            # Once per outage; `on_unavailable` counts every failure.
            log.warning("redis_registry_unavailable", reason=reason)
        self._error = reason
        if self._on_unavailable is not None:
            self._on_unavailable(operation)
        return RegistryUnavailable(reason)

    def _succeeded(self) -> None:
        if self._error is not None:
            log.info("redis_registry_recovered", after=self._error)
            self._error = None

    async def _arrivals(self, tokens: list[str]) -> list[tuple[str, tuple[float, str]]]:
        """The tokens of `tokens` that arrived, in order, with their arrivals: one round trip."""

        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for token in tokens:
                pipe.hmget(self._key(token), list(_ARRIVAL_FIELDS))
            return list(await pipe.execute())

        entries = await self._bounded("wait", read())
        return [
            (token, arrival)
            for token, fields in zip(tokens, entries, strict=True)
            if (arrival := _arrival(fields)) is not None
        ]

    async def _next_wake(self, wakes: _Wakes, *, polling: bool) -> str | None:
        """The next token to look at, or None to look at all: while Redis is away or the
        listener is not subscribed, at least every `RETRY_S`."""
        if not polling and self._subscribed.is_set():
            return await wakes.get()
        try:
            async with asyncio.timeout(RETRY_S):
                return await wakes.get()
        except TimeoutError:
            return None

    def _wake(self, token: str | None) -> None:
        for wanted, wakes in self._waiters:
            if token is None or token in wanted:
                wakes.put_nowait(token)

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._relay_arrivals(pubsub)
            except (TimeoutError, RedisError, OSError) as exc:
                self._failed("listen", exc)
            finally:
                self._subscribed.clear()
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Waiters that were not polling start now.
            self._wake(None)
            await asyncio.sleep(RETRY_S)

    async def _relay_arrivals(self, pubsub: PubSub) -> None:
        """Subscribe and pass arrivals to the waiters, until the connection fails or falls
        silent."""
        async with asyncio.timeout(self._timeout_s):
            await pubsub.subscribe(self._channel)
        pinged = False
        while True:
            async with asyncio.timeout(HEARTBEAT_S + self._timeout_s):
                message = await pubsub.get_message(timeout=HEARTBEAT_S)
            if message is not None:
                pinged = False
                self._dispatch(message)
            elif pinged:
                raise TimeoutError(f"no answer to PING within {HEARTBEAT_S:g} s")
            else:
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.ping()
                pinged = True

    def _dispatch(self, message: dict[str, Any]) -> None:
        match message.get("type"):
            case "subscribe":
                # Also after redis-py has reconnected by itself: whatever was published in
                # between is found by looking back.
                self._subscribed.set()
                self._succeeded()
                self._wake(None)
            case "message" if isinstance(data := message.get("data"), bytes):
                self._wake(data.decode("ascii", "replace"))
