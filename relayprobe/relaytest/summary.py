"""The summary of a relay test as a fold over its events. Pure.

The engine emits every fact as it happens (each probe's fate, each arrival, what TLS did, how
the test ended); `summarize` reads them back into the `Summary` that the telnet transcript, the
JSON result and the history all end with, so none of them can tell a different story.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from relayprobe.relaytest.events import (
    ConfirmationEnded,
    Connecting,
    Event,
    Greeted,
    Note,
    Outcome,
    ProbeFinished,
    ProbeStarted,
    Progress,
    Received,
    Relayed,
    RelayTestEnded,
    Sent,
    Summary,
    TlsDemanded,
    TlsOffered,
    TlsReport,
    TlsStarted,
    TlsUnused,
)
from relayprobe.relaytest.verdict import Confirmation, summary_lines, verdict
from relayprobe.reports.render import tls_line

TRANSCRIPT_ONLY: frozenset[type[Event]] = frozenset({Sent, Received, Progress, ProbeStarted})
"""Events the fold reads nothing from: most of a test's events, which it need not keep."""


def _tls_notes(tls: TlsReport, failure: str | None, policy: str) -> tuple[str, ...]:
    if tls.used is not None:
        why = "the server requires STARTTLS" if tls.required else f"--starttls {policy}"
        return (f"the probes ran over TLS ({why}): {tls_line(tls.used)}",)
    if failure is not None and not tls.required:
        return (f"the probes ran in plaintext: {failure}",)
    if tls.offered and not tls.required:
        return ("the server offers STARTTLS; the probes ran in plaintext, as a spammer's would",)
    return ()


def summarize(
    events: Iterable[Event], *, notes: Sequence[str] = (), starttls: str = "auto"
) -> Summary:
    """The summary of the test that `events` tell, ending with its `RelayTestEnded`.

    `notes` are the caller's own `Note:` lines; `starttls` is the policy the test ran with.
    """
    target, banner = "", None
    probes: list[ProbeFinished] = []
    arrived: set[str] = set()
    confirmation: Confirmation | None = None
    offered = required = False
    used: TlsStarted | None = None
    failure: str | None = None
    noted: list[str] = []
    ended: RelayTestEnded | None = None
    for event in events:
        match event:
            case Connecting(address=address):
                target = address
            case Greeted(banner=text) if banner is None:
                banner = text
            case ProbeFinished():
                probes.append(event)
            case Relayed(name=name):
                arrived.add(name)
            case ConfirmationEnded(sent=sent, wait_s=wait_s):
                came = tuple(name for name in sent if name in arrived)
                confirmation = Confirmation(sent=sent, arrived=came, wait_s=wait_s)
            case TlsOffered():
                offered = True
            case TlsDemanded():
                required = True
            case TlsStarted():
                used = event
            case TlsUnused(reason=reason):
                failure = reason
            case Note(text=text):
                noted.append(text)
            case RelayTestEnded():
                ended = event
    if ended is None:
        raise ValueError("the events of an unfinished test: no RelayTestEnded")
    if confirmation is not None:
        probes = [
            dataclasses.replace(probe, outcome=Outcome.RELAYED)
            if probe.name in confirmation.arrived
            else probe
            for probe in probes
        ]
    tls = TlsReport(offered=offered, required=required, used=used)
    return Summary(
        target=target,
        host=ended.host,
        banner=banner,
        verdict=verdict(probes, incomplete=ended.incomplete, confirmation=confirmation),
        lines=summary_lines(
            probes,
            banner=banner,
            incomplete=ended.incomplete,
            confirmation=confirmation,
            notes=(*notes, *noted, *_tls_notes(tls, failure, starttls)),
        ),
        probes=tuple(probes),
        started_at=ended.started_at,
        duration_s=ended.duration_s,
        tls=tls,
    )
