"""Turn events into the seed-format transcript and into the JSON result. Pure."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from relayprobe.events import (
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


def text_lines(event: Event) -> tuple[str, ...]:
    """The transcript lines for one event (without line endings)."""
    match event:
        case Connecting(address=address):
            return (f"Connecting to {address} ...",)
        case Sent(line=line):
            return (f">>> {line}",)
        case Received(line=line):
            return (f"<<< {line}",)
        case ProbeStarted(name=name):
            return (f":Relay test: #{name}",)
        case Progress(text=text):
            return (f":{text}",)
        case Relayed(name=name, after_s=after_s, source=source):
            return (f":Relayed: {name} arrived after {after_s:.1f} s from {source}",)
        case Summary(lines=lines):
            return lines
        case ProbeFinished():
            return ()


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
        "summary": list(summary.lines),
        "probes": [
            {
                "name": probe.name,
                "mail_from": probe.mail_from,
                "rcpt_to": probe.rcpt_to,
                "outcome": probe.outcome.value,
                "reply": probe.reply,
                "form": probe.form.value,
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
