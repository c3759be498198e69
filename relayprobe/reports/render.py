"""Turn events into the seed-format transcript and into the JSON result. Pure."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from relayprobe.relaytest.events import (
    Certificate,
    Connecting,
    Event,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    Progress,
    Received,
    Relayed,
    Sent,
    ServiceMessage,
    Summary,
    TlsReport,
    TlsStarted,
)

_TLS_VERSIONS = {"TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}


def tls_line(tls: TlsStarted) -> str:
    """`TLS 1.3, TLS_AES_256_GCM_SHA384, certificate CN=mx.example.net, self-signed, expires
    2027-03-01`: what STARTTLS negotiated, in one line."""
    parts = [_TLS_VERSIONS.get(tls.version, tls.version), tls.cipher]
    certificate = tls.certificate
    if certificate is None:
        parts.append("no certificate shown")
    else:
        parts.append(f"certificate {certificate.subject}")
        parts.append(
            "self-signed" if certificate.self_signed else f"issued by {certificate.issuer}"
        )
        parts.append(f"expires {certificate.not_after}")
    return ", ".join(parts)


def _certificate_json(certificate: Certificate | None) -> dict[str, Any] | None:
    if certificate is None:
        return None
    return {
        "subject": certificate.subject,
        "issuer": certificate.issuer,
        "not_after": certificate.not_after,
        "self_signed": certificate.self_signed,
    }


def _tls_json(tls: TlsReport) -> dict[str, Any]:
    used = tls.used
    return {
        "offered": tls.offered,
        "required": tls.required,
        "used": used is not None,
        "version": None if used is None else _TLS_VERSIONS.get(used.version, used.version),
        "cipher": None if used is None else used.cipher,
        "certificate": None if used is None else _certificate_json(used.certificate),
    }


def text_lines(event: Event) -> tuple[str, ...]:
    """The transcript lines for one event (without line endings)."""
    # The commonest events first: a match tries its cases in order.
    match event:
        case Sent(line=line):
            return (f">>> {line}",)
        case Received(lines=lines):
            return tuple([f"<<< {line}" for line in lines])
        case ProbeStarted(name=name):
            return (f":Relay test: #{name}",)
        case ProbeFinished():
            return ()  # a fact for the summary, one per probe
        case Progress(text=text):
            return (f":{text}",)
        case ServiceMessage(lines=lines):
            return lines
        case Connecting(address=address):
            return (f"Connecting to {address} ...",)
        case TlsStarted():
            return (f":{tls_line(event)}",)
        case Relayed(name=name, after_s=after_s, source=source):
            return (f":Relayed: {name} arrived after {after_s:.1f} s from {source}",)
        case Summary(lines=lines):
            return lines
        case _:
            # The rest (Greeted, ProbeFinished, TLS states, Note, RelayTestEnded...) are facts for
            # the summary: their lines are the summary's.
            return ()


def ndjson_records(event: Event, lines: Sequence[str]) -> list[dict[str, Any]]:
    """The NDJSON records of one event: its transcript lines, and a probe's outcome."""
    records: list[dict[str, Any]] = [{"type": "line", "text": line} for line in lines]
    if isinstance(event, ProbeFinished):
        records.append({"type": "probe", "name": event.name, "outcome": event.outcome.value})
    return records


def _count(probes: Sequence[ProbeFinished], *outcomes: Outcome) -> int:
    return sum(1 for probe in probes if probe.outcome in outcomes)


def json_result(summary: Summary, transcript: Sequence[str]) -> dict[str, Any]:
    """The JSON result of the spec: what `check --json` prints and the history stores."""
    probes = summary.probes
    return {
        "target": summary.target,
        "host": summary.host,
        "banner": summary.banner,
        "started_at": datetime.datetime.fromtimestamp(summary.started_at, datetime.UTC).isoformat(),
        "duration_s": round(summary.duration_s, 3),
        "verdict": summary.verdict,
        # Only delivery to the canary sink proves relaying; a 250 at RCPT alone does not.
        "proven": summary.verdict == "relayed",
        "accepted": _count(probes, Outcome.ACCEPTED, Outcome.RELAYED),
        "relayed": _count(probes, Outcome.RELAYED),
        "deferred": _count(probes, Outcome.DEFERRED),
        "rejected": _count(probes, Outcome.REJECTED),
        "errors": _count(probes, Outcome.ERROR),
        "tls": _tls_json(summary.tls),
        "summary": list(summary.lines),
        "probes": [
            {
                "name": probe.name,
                "mail_from": probe.mail_from,
                "rcpt_to": probe.rcpt_to,
                "outcome": probe.outcome.value,
                "reply": probe.reply,
                "form": probe.form.value,
                "tls": probe.tls,
            }
            for probe in probes
        ],
        "transcript": list(transcript),
    }


# A hostile server can make a long transcript; what is kept for the record is bounded.
MAX_KEPT_CHARS = 256 * 1024


class Transcript:
    """Collects the transcript lines of a test while passing each on as it happens.

    Past `max_chars` the middle of the transcript is not kept (one line says so); the summary
    block always is.
    """

    def __init__(self, *, max_chars: int = MAX_KEPT_CHARS) -> None:
        self.lines: list[str] = []
        self.summary: Summary | None = None
        self._room = max_chars
        self._dropped = 0

    def add(self, event: Event) -> tuple[str, ...]:
        lines = text_lines(event)
        if isinstance(event, Summary):
            self.summary = event
            if self._dropped:
                self.lines.append(f":({self._dropped} transcript lines not kept)")
            self.lines.extend(lines)
            return lines
        for line in lines:
            self._room -= len(line)
            if self._room >= 0:
                self.lines.append(line)
            else:
                self._dropped += 1
        return lines
