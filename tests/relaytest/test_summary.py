"""summarize: the summary as a fold over a test's events, driven with events alone."""

from __future__ import annotations

import pytest

from relayprobe.relaytest.events import (
    Certificate,
    ConfirmationEnded,
    Connecting,
    Event,
    Greeted,
    Note,
    Outcome,
    ProbeFinished,
    Received,
    Relayed,
    RelayTestEnded,
    TlsDemanded,
    TlsOffered,
    TlsStarted,
    TlsUnused,
)
from relayprobe.relaytest.summary import summarize

BANNER = "220 mx.example.net ESMTP"
TLS = TlsStarted(
    "TLSv1.3",
    "TLS_AES_256_GCM_SHA384",
    Certificate("CN=mx.example.net", "CN=mx.example.net", "2027-03-01", self_signed=True),
)


def probe(name: str, outcome: Outcome, *, tls: bool = False) -> ProbeFinished:
    return ProbeFinished(name, "<a@b>", "<c@d>", outcome, "250 ok", tls=tls)


def events(*middle: Event, incomplete: str | None = None) -> list[Event]:
    return [
        Connecting("192.0.2.25", 25),
        Received((BANNER,)),
        Greeted(BANNER, "mx.example.net"),
        *middle,
        RelayTestEnded(
            incomplete=incomplete, host="mx.example.net", started_at=1e9, duration_s=0.5
        ),
    ]


def test_a_relayed_probe_is_relayed_in_the_summary_though_its_answer_was_accepted() -> None:
    summary = summarize(
        events(
            probe("Test 1", Outcome.ACCEPTED),
            probe("Test 2", Outcome.ACCEPTED),
            probe("Test 3", Outcome.REJECTED),
            Relayed("Test 2", 0.4, "192.0.2.25"),
            ConfirmationEnded(sent=("Test 1", "Test 2"), wait_s=30.0),
        )
    )
    assert [p.outcome for p in summary.probes] == [
        Outcome.ACCEPTED,
        Outcome.RELAYED,
        Outcome.REJECTED,
    ]
    assert summary.verdict == "relayed"
    assert (summary.target, summary.host, summary.banner) == (
        "192.0.2.25",
        "mx.example.net",
        BANNER,
    )
    assert "Relay confirmed: 1 of 2 test messages arrived (Test 2)" in summary.lines


def test_an_arrival_after_the_wait_or_without_a_message_does_not_count() -> None:
    summary = summarize(
        events(
            probe("Test 1", Outcome.ACCEPTED),
            Relayed("Test 9", 0.4, "192.0.2.25"),
            ConfirmationEnded(sent=("Test 1",), wait_s=5.0),
        )
    )
    assert summary.verdict == "accepted"
    assert "Relay not confirmed: none of 1 test messages arrived within 5 s" in summary.lines


def test_untried_probes_are_errors_and_the_reason_is_the_verdict() -> None:
    summary = summarize(
        events(probe("Test 1", Outcome.ERROR), incomplete="test deadline of 300 s reached")
    )
    assert summary.verdict == "incomplete"
    assert "Test incomplete: test deadline of 300 s reached" in summary.lines


def test_notes_come_in_order_and_the_plain_line_last() -> None:
    summary = summarize(
        events(probe("Test 1", Outcome.REJECTED), Note("from the engine")),
        notes=("from the caller",),
    )
    assert summary.lines[-3:] == (
        "Note: from the caller",
        "Note: from the engine",
        "Note: every relay attempt was refused: not an open relay to these probes",
    )


@pytest.mark.parametrize(
    ("tls_events", "policy", "note", "report"),
    [
        ((), "auto", None, (False, False, False)),
        (
            (TlsOffered(),),
            "auto",
            "Note: the server offers STARTTLS; the probes ran in plaintext, as a spammer's would",
            (True, False, False),
        ),
        (
            (TlsOffered(), TlsDemanded(530), TLS),
            "auto",
            "Note: the probes ran over TLS (the server requires STARTTLS): TLS 1.3, "
            "TLS_AES_256_GCM_SHA384, certificate CN=mx.example.net, self-signed, "
            "expires 2027-03-01",
            (True, True, True),
        ),
        (
            (TlsOffered(), TLS),
            "always",
            "Note: the probes ran over TLS (--starttls always): TLS 1.3, TLS_AES_256_GCM_SHA384, "
            "certificate CN=mx.example.net, self-signed, expires 2027-03-01",
            (True, False, True),
        ),
        (
            (TlsOffered(), TlsUnused("TLS handshake failed: SSLError")),
            "always",
            "Note: the probes ran in plaintext: TLS handshake failed: SSLError",
            (True, False, False),
        ),
    ],
)
def test_what_tls_did_is_reported_and_noted(
    tls_events: tuple[Event, ...],
    policy: str,
    note: str | None,
    report: tuple[bool, bool, bool],
) -> None:
    summary = summarize(
        events(*tls_events, probe("Test 1", Outcome.REJECTED, tls=TLS in tls_events)),
        starttls=policy,
    )
    tls = summary.tls
    assert (tls.offered, tls.required, tls.used is not None) == report
    tls_notes = [line for line in summary.lines if "TLS" in line]
    assert tls_notes == ([note] if note else [])


def test_a_fold_without_its_end_is_refused() -> None:
    with pytest.raises(ValueError, match="no RelayTestEnded"):
        summarize([Connecting("192.0.2.25", 25), probe("Test 1", Outcome.REJECTED)])
