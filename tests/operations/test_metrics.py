from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayprobe.operations.metrics import OUTCOMES, REFUSAL_REASONS, VERDICTS, Metrics
from relayprobe.relaytest.events import Outcome

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    body, _ = metrics.exposition()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[name, frozenset(labels.items())]


def test_every_series_is_exported_at_zero_from_the_start() -> None:
    metrics = Metrics()
    assert value(metrics, "relayprobe_tests_started_total") == 0
    assert value(metrics, "relayprobe_sink_deliveries_total") == 0
    assert value(metrics, "relayprobe_active_sessions") == 0
    assert value(metrics, "relayprobe_session_duration_seconds_count") == 0
    for verdict in ("rejected", "accepted", "relayed", "incomplete"):
        assert value(metrics, "relayprobe_tests_finished_total", verdict=verdict) == 0
    for outcome in ("rejected", "deferred", "accepted", "relayed", "error"):
        assert value(metrics, "relayprobe_probe_outcomes_total", outcome=outcome) == 0
    for reason in REFUSAL_REASONS:
        assert value(metrics, "relayprobe_refusals_total", reason=reason) == 0


def test_label_sets_match_the_contract() -> None:
    assert VERDICTS == ("rejected", "accepted", "relayed", "incomplete")
    assert set(OUTCOMES) == {"rejected", "deferred", "accepted", "relayed", "error"}
    assert {"busy", "access", "rate_address", "rate_prefix", "rate_global"} <= set(REFUSAL_REASONS)


def test_finished_tests_count_verdict_outcomes_and_duration() -> None:
    metrics = Metrics()
    metrics.test_started()
    metrics.test_started()
    metrics.test_finished(
        "relayed", 12.5, [Outcome.REJECTED, "accepted", Outcome.RELAYED, "rejected"]
    )
    metrics.test_finished("incomplete", 0.07, [])

    assert value(metrics, "relayprobe_tests_started_total") == 2
    assert value(metrics, "relayprobe_tests_finished_total", verdict="relayed") == 1
    assert value(metrics, "relayprobe_tests_finished_total", verdict="incomplete") == 1
    assert value(metrics, "relayprobe_tests_finished_total", verdict="rejected") == 0
    assert value(metrics, "relayprobe_probe_outcomes_total", outcome="rejected") == 2
    assert value(metrics, "relayprobe_probe_outcomes_total", outcome="accepted") == 1
    assert value(metrics, "relayprobe_probe_outcomes_total", outcome="relayed") == 1
    assert value(metrics, "relayprobe_probe_outcomes_total", outcome="deferred") == 0
    assert value(metrics, "relayprobe_session_duration_seconds_count") == 2
    assert value(metrics, "relayprobe_session_duration_seconds_sum") == pytest.approx(12.57)
    bucket = "relayprobe_session_duration_seconds_bucket"
    assert value(metrics, bucket, le="0.05") == 0
    assert value(metrics, bucket, le="0.1") == 1
    assert value(metrics, bucket, le="10.0") == 1
    assert value(metrics, bucket, le="20.0") == 2
    assert value(metrics, bucket, le="300.0") == 2


@pytest.mark.parametrize(
    ("verdict", "duration_s", "outcomes"),
    [
        ("open", 1.0, ["accepted"]),
        ("relayed", 1.0, ["accepted", "bounced"]),
        ("relayed", -0.1, ["accepted"]),
    ],
)
def test_invalid_finished_test_raises_and_counts_nothing(
    verdict: str, duration_s: float, outcomes: list[str]
) -> None:
    metrics = Metrics()
    before = samples(metrics)
    with pytest.raises(ValueError):
        metrics.test_finished(verdict, duration_s, outcomes)
    assert samples(metrics) == before


def test_refusals_are_counted_by_reason() -> None:
    metrics = Metrics()
    metrics.refused("busy")
    metrics.refused("busy")
    metrics.refused("rate_prefix")
    assert value(metrics, "relayprobe_refusals_total", reason="busy") == 2
    assert value(metrics, "relayprobe_refusals_total", reason="rate_prefix") == 1
    assert value(metrics, "relayprobe_refusals_total", reason="access") == 0
    with pytest.raises(ValueError, match="unknown refusal reason"):
        metrics.refused("Busy")


def test_sink_deliveries_are_counted() -> None:
    metrics = Metrics()
    metrics.sink_delivery()
    assert value(metrics, "relayprobe_sink_deliveries_total") == 1


def test_session_gauge_follows_opened_and_closed_sessions() -> None:
    metrics = Metrics()
    metrics.session_opened()
    metrics.session_opened()
    assert value(metrics, "relayprobe_active_sessions") == 2
    metrics.session_closed()
    assert value(metrics, "relayprobe_active_sessions") == 1
    metrics.session_closed()
    assert value(metrics, "relayprobe_active_sessions") == 0


def test_instances_do_not_share_counters() -> None:
    first, second = Metrics(), Metrics()
    first.test_started()
    assert value(first, "relayprobe_tests_started_total") == 1
    assert value(second, "relayprobe_tests_started_total") == 0


def test_exposition_is_prometheus_text() -> None:
    body, content_type = Metrics().exposition()
    assert content_type.startswith("text/plain; version=")
    assert b"# TYPE relayprobe_tests_started_total counter" in body
