"""The Redis client of every part that shares state through Redis, made one way.

redis-py's default pool refuses a burst beyond its size at once; a `BlockingConnectionPool`
makes the burst wait, and the caller bounds that wait with the call it makes. A connection a
timeout interrupted is closed, never reused, and the pool reconnects by itself.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relayprobe.relaytest.sanitize import sanitize_text

# Cut from a failure before it becomes a log field or a /readyz line.
MAX_ERROR_CHARS = 200


def connect(url: str, *, timeout_s: float, max_connections: int) -> Redis:
    """A client for `url` (`redis://`, `rediss://` or `unix://`; it may hold a password, so it
    is never logged) whose sockets give up after `timeout_s`. Connects on first use."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,  # the wait for a free connection is bounded with the call
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a fresh connection: a pooled one may have died with a restarted
        # server. More would only run into the caller's timeout.
        retry=Retry(NoBackoff(), 1),
    )
    return Redis.from_pool(pool)


def failure_reason(error: BaseException, *, timeout_s: float) -> str:
    """Why a Redis call failed, as one safe line: the text may quote the server, and it goes to
    the log and to /readyz."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"no answer within {timeout_s:g} s"
    text = sanitize_text(" ".join(f"{type(error).__name__}: {error}".split()))
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}..."
