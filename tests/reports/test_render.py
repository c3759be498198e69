from __future__ import annotations

import dataclasses
import json

import pytest

from relayprobe.relaytest.events import (
    Connecting,
    Event,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    Progress,
    Received,
    Relayed,
    Sent,
    Summary,
)
from relayprobe.relaytest.probes import AddressForm
from relayprobe.reports.render import Transcript, json_result, text_lines

TEST_8 = ProbeFinished(
    "Test 8",
    "<spamtest@mail2.example.com>",
    "<nobody%relaytest.invalid@mail2.example.com>",
    Outcome.ACCEPTED,
    "250 2.1.5 Ok",
    AddressForm.PERCENT_HACK,
)
QUOTE = ProbeFinished(
    "Quote test",
    "<spamtest@mail2.example.com>",
    '<"nobody@relaytest.invalid">',
    Outcome.REJECTED,
    "554 5.7.1 Relay access denied",
    AddressForm.QUOTED,
)
SUMMARY = Summary(
    target="192.0.2.4",
    host="mail2.example.com",
    banner="220 mail2.example.com ESMTP Postfix",
    verdict="accepted",
    lines=(
        "Tested host banner: 220 mail2.example.com ESMTP Postfix",
        "System appeared to accept 1 relay attempts",
    ),
    probes=(
        QUOTE,
        TEST_8,
        ProbeFinished("Test 9", "<a>", "<b>", Outcome.RELAYED, "250 Ok"),
        ProbeFinished("Test 10", "<a>", "<b>", Outcome.DEFERRED, "451 later"),
        ProbeFinished("Test 11", "<a>", "<b>", Outcome.DEFERRED, "452 full"),
        ProbeFinished("Test 12", "<a>", "<b>", Outcome.ERROR, ""),
    ),
    started_at=1_700_000_000.25,
    duration_s=1.23456,
)


@pytest.mark.parametrize(
    ("event", "lines"),
    [
        # Lines as they appear in the seed transcripts.
        (Connecting("192.168.0.4", 25), ("Connecting to 192.168.0.4 ...",)),
        (
            Received(("220 mail2.example.com ESMTP Postfix",)),
            ("<<< 220 mail2.example.com ESMTP Postfix",),
        ),
        (Sent("rset"), (">>> rset",)),
        (ProbeStarted("Quote test"), (":Relay test: #Quote test",)),
        (ProbeStarted("Test 1"), (":Relay test: #Test 1",)),
        # And what relayprobe sends beyond them.
        (Connecting("192.0.2.4", 25), ("Connecting to 192.0.2.4 ...",)),
        (Connecting("2001:db8::4", 25), ("Connecting to 2001:db8::4 ...",)),
        (Sent("EHLO relayprobe.invalid"), (">>> EHLO relayprobe.invalid",)),
        (
            Sent("MAIL FROM:<spamtest@mail2.example.com>"),
            (">>> MAIL FROM:<spamtest@mail2.example.com>",),
        ),
        (
            Received(("250-mail2.example.com", "250 Ok")),
            ("<<< 250-mail2.example.com", "<<< 250 Ok"),
        ),
        (Received(("250 Ok",)), ("<<< 250 Ok",)),
        (ProbeStarted("Test 19"), (":Relay test: #Test 19",)),
        (Progress("Reconnecting after 421"), (":Reconnecting after 421",)),
        (
            Relayed("Test 8", 2.345, "192.0.2.7"),
            (":Relayed: Test 8 arrived after 2.3 s from 192.0.2.7",),
        ),
        (
            Relayed("Test 3", 0.4, "2001:db8::7"),
            (":Relayed: Test 3 arrived after 0.4 s from 2001:db8::7",),
        ),
        (SUMMARY, SUMMARY.lines),
        (TEST_8, ()),
    ],
)
def test_text_lines(event: Event, lines: tuple[str, ...]) -> None:
    assert text_lines(event) == lines


def test_json_result_has_the_spec_keys_and_counts() -> None:
    transcript = ["Connecting to 192.0.2.4 ...", "<<< 220 mail2.example.com ESMTP Postfix"]
    result = json_result(SUMMARY, transcript)
    assert {
        "target",
        "host",
        "banner",
        "started_at",
        "duration_s",
        "verdict",
        "proven",
        "accepted",
        "relayed",
        "deferred",
        "probes",
        "transcript",
    } <= set(result)
    assert result["target"] == "192.0.2.4"
    assert result["host"] == "mail2.example.com"
    assert result["banner"] == "220 mail2.example.com ESMTP Postfix"
    assert result["started_at"] == "2023-11-14T22:13:20.250000+00:00"
    assert result["duration_s"] == 1.235
    assert result["verdict"] == "accepted"
    assert result["proven"] is False
    assert (result["accepted"], result["relayed"], result["deferred"]) == (2, 1, 2)
    assert (result["rejected"], result["errors"]) == (1, 1)
    assert result["summary"] == list(SUMMARY.lines)
    assert result["transcript"] == transcript
    assert result["probes"][:2] == [
        {
            "name": "Quote test",
            "mail_from": "<spamtest@mail2.example.com>",
            "rcpt_to": '<"nobody@relaytest.invalid">',
            "outcome": "rejected",
            "reply": "554 5.7.1 Relay access denied",
            "form": "quoted local part",
            "tls": False,
        },
        {
            "name": "Test 8",
            "mail_from": "<spamtest@mail2.example.com>",
            "rcpt_to": "<nobody%relaytest.invalid@mail2.example.com>",
            "outcome": "accepted",
            "reply": "250 2.1.5 Ok",
            "form": "%-hack",
            "tls": False,
        },
    ]
    assert [p["outcome"] for p in result["probes"]] == [
        "rejected",
        "accepted",
        "relayed",
        "deferred",
        "deferred",
        "error",
    ]


def test_json_result_of_an_incomplete_test() -> None:
    summary = Summary(
        target="2001:db8::4",
        host="2001:db8::4",
        banner=None,
        verdict="incomplete",
        lines=("Test incomplete: connection refused",),
        probes=(),
        started_at=0.0,
        duration_s=0.0004,
    )
    result = json_result(summary, ["Connecting to 2001:db8::4 ..."])
    assert result["banner"] is None
    assert result["verdict"] == "incomplete"
    assert result["started_at"] == "1970-01-01T00:00:00+00:00"
    assert result["duration_s"] == 0.0
    assert (result["accepted"], result["relayed"], result["deferred"]) == (0, 0, 0)
    assert result["probes"] == []


def test_json_result_is_serialisable() -> None:
    result = json_result(SUMMARY, ["<<< 220 \\x1b[2J"])
    assert json.loads(json.dumps(result)) == result


def test_transcript_collects_lines_and_keeps_the_summary() -> None:
    transcript = Transcript()
    assert transcript.add(Connecting("192.0.2.4", 25)) == ("Connecting to 192.0.2.4 ...",)
    assert transcript.add(ProbeStarted("Test 8")) == (":Relay test: #Test 8",)
    assert transcript.add(TEST_8) == ()
    assert transcript.summary is None
    assert transcript.add(SUMMARY) == SUMMARY.lines
    assert transcript.summary is SUMMARY
    assert transcript.lines == [
        "Connecting to 192.0.2.4 ...",
        ":Relay test: #Test 8",
        *SUMMARY.lines,
    ]


@pytest.mark.parametrize(
    ("verdict", "proven"),
    [("relayed", True), ("accepted", False), ("rejected", False), ("incomplete", False)],
)
def test_only_a_relayed_verdict_is_proven(verdict: str, proven: bool) -> None:
    result = json_result(dataclasses.replace(SUMMARY, verdict=verdict), [])
    assert result["verdict"] == verdict
    assert result["proven"] is proven
