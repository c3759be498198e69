from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from relayprobe.storage.redisclient import MAX_ERROR_CHARS, failure_reason


def test_a_failure_is_one_safe_bounded_line() -> None:
    """The text may quote the server: it goes to the log and to /readyz as one harmless line."""
    error = RedisConnectionError("Error 111\r\nconnecting to \x1b[2Jredis:6379." + "x" * 500)
    reason = failure_reason(error, timeout_s=0.2)
    assert reason.startswith("ConnectionError: Error 111 connecting to \\x1b[2Jredis:6379.x")
    assert "\x1b" not in reason and "\n" not in reason
    assert len(reason) == MAX_ERROR_CHARS + len("...")


def test_a_bare_timeout_says_how_long_was_waited() -> None:
    assert failure_reason(TimeoutError(), timeout_s=0.2) == "no answer within 0.2 s"
    assert failure_reason(TimeoutError("read"), timeout_s=0.2) == "TimeoutError: read"
