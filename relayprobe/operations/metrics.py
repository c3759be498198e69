"""Prometheus metrics for operators: tests run, their verdicts, probe outcomes, refusals, and
what shared state (Redis, the history's database) failed to do.

Each `Metrics` owns its registry, so several instances (and tests) never share counters.
Label values are fixed sets checked on use: a typo fails loudly instead of creating a series,
and every known value is exported from the start, at zero.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relayprobe.relaytest.events import Outcome

VERDICTS = ("rejected", "accepted", "relayed", "incomplete")
OUTCOMES = tuple(outcome.value for outcome in Outcome)
REFUSAL_REASONS = (
    "busy",
    "access",
    "rate_address",
    "rate_prefix",
    "rate_global",
    "proxy",
    "slow_client",
)
# What the shared registry is asked to do (`redisregistry.RedisRegistry`'s operations).
REGISTRY_OPERATIONS = (
    "register",
    "is_pending",
    "message_secret",
    "mark_arrived",
    "wait",
    "forget",
    "listen",
)
# From a banner refused at once (tens of ms) to a full run of 20 probes waiting for relayed mail.
SESSION_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 240, 300)


def _check(kind: str, value: str, known: tuple[str, ...]) -> str:
    if value not in known:
        raise ValueError(f"unknown {kind} {value!r}, expected one of {', '.join(known)}")
    return value


class Metrics:
    """The service's counters, gauge and histogram, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._tests_started = Counter(
            "relayprobe_tests_started",
            "Relay tests started.",
            registry=self.registry,
        )
        self._tests_finished = Counter(
            "relayprobe_tests_finished",
            "Relay tests finished, by verdict.",
            ["verdict"],
            registry=self.registry,
        )
        self._probe_outcomes = Counter(
            "relayprobe_probe_outcomes",
            "Relay probes run, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self._active_sessions = Gauge(
            "relayprobe_active_sessions",
            "Telnet sessions open now.",
            registry=self.registry,
        )
        self._refusals = Counter(
            "relayprobe_refusals",
            "Telnet sessions refused before a test, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._sink_deliveries = Counter(
            "relayprobe_sink_deliveries",
            "Test messages received by the canary sink.",
            registry=self.registry,
        )
        self._session_duration = Histogram(
            "relayprobe_session_duration_seconds",
            "Duration of finished relay tests.",
            buckets=SESSION_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._rate_limit_fallbacks = Counter(
            "relayprobe_rate_limit_fallbacks",
            "Admissions decided by this replica alone because the shared rate limits failed.",
            registry=self.registry,
        )
        self._registry_failures = Counter(
            "relayprobe_registry_failures",
            "Calls to the shared token registry that failed or timed out, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self._history_dropped = Counter(
            "relayprobe_history_dropped",
            "Results that were never saved in the history.",
            registry=self.registry,
        )
        for verdict in VERDICTS:
            self._tests_finished.labels(verdict=verdict)
        for outcome in OUTCOMES:
            self._probe_outcomes.labels(outcome=outcome)
        for reason in REFUSAL_REASONS:
            self._refusals.labels(reason=reason)
        for operation in REGISTRY_OPERATIONS:
            self._registry_failures.labels(operation=operation)

    def test_started(self) -> None:
        self._tests_started.inc()

    def test_finished(self, verdict: str, duration_s: float, outcomes: Iterable[str]) -> None:
        """Count a finished test, its duration and the outcome of each of its probes.

        Raises ValueError for an unknown verdict or outcome, or a negative duration, before
        counting anything.
        """
        _check("verdict", verdict, VERDICTS)
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, not {duration_s}")
        checked = [_check("outcome", outcome, OUTCOMES) for outcome in outcomes]
        self._tests_finished.labels(verdict=verdict).inc()
        self._session_duration.observe(duration_s)
        # One labelled child per outcome, not per probe: labels() takes a lock and a lookup.
        for outcome, count in collections.Counter(checked).items():
            self._probe_outcomes.labels(outcome=outcome).inc(count)

    def refused(self, reason: str) -> None:
        """Count a refused session; raises ValueError for a reason not in REFUSAL_REASONS."""
        self._refusals.labels(reason=_check("refusal reason", reason, REFUSAL_REASONS)).inc()

    def sink_delivery(self) -> None:
        self._sink_deliveries.inc()

    def rate_limit_fallback(self) -> None:
        self._rate_limit_fallbacks.inc()

    def registry_failure(self, operation: str) -> None:
        """Count a failed registry call; raises ValueError for an unknown operation."""
        checked = _check("registry operation", operation, REGISTRY_OPERATIONS)
        self._registry_failures.labels(operation=checked).inc()

    def history_dropped(self, count: int) -> None:
        """Count results lost; thread-safe (the history writer calls it from its thread)."""
        self._history_dropped.inc(count)

    def session_opened(self) -> None:
        self._active_sessions.inc()

    def session_closed(self) -> None:
        self._active_sessions.dec()

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
