"""From probe outcomes to the verdict and the exact summary block of the spec. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from relayprobe.relaytest.events import Outcome, ProbeFinished
from relayprobe.relaytest.probes import AddressForm


@dataclass(frozen=True, slots=True, kw_only=True)
class Confirmation:
    """How delivery confirmation went, when it was on."""

    sent: tuple[str, ...]
    """Probes whose test message the tested server accepted."""
    arrived: tuple[str, ...]
    wait_s: float


def _names(probes: Sequence[str]) -> str:
    return ", ".join(probes)


def verdict(
    probes: Sequence[ProbeFinished], *, incomplete: str | None, confirmation: Confirmation | None
) -> str:
    """`rejected`, `accepted`, `relayed` or `incomplete`, as in the JSON result."""
    if confirmation is not None and confirmation.arrived:
        return "relayed"
    if any(probe.outcome in (Outcome.ACCEPTED, Outcome.RELAYED) for probe in probes):
        return "accepted"
    if incomplete is not None or any(probe.outcome is Outcome.ERROR for probe in probes):
        return "incomplete"
    return "rejected"


def summary_lines(
    probes: Sequence[ProbeFinished],
    *,
    banner: str | None,
    incomplete: str | None,
    confirmation: Confirmation | None,
    notes: Sequence[str] = (),
) -> tuple[str, ...]:
    """The last lines of the transcript, worded exactly as the spec says."""
    lines: list[str] = []
    if banner is not None:
        lines.append(f"Tested host banner: {banner}")
    accepted = [p.name for p in probes if p.outcome in (Outcome.ACCEPTED, Outcome.RELAYED)]
    errors = [p.name for p in probes if p.outcome is Outcome.ERROR]
    deferred = [p.name for p in probes if p.outcome is Outcome.DEFERRED]
    if accepted:
        lines.append(f"System appeared to accept {len(accepted)} relay attempts")
    elif incomplete is not None:
        lines.append(f"Test incomplete: {incomplete}")
    elif errors:
        lines.append(f"Test incomplete: {len(errors)} probes got no reply ({_names(errors)})")
    else:
        lines.append("System appeared to reject relay attempts")
    if confirmation is not None and accepted and not confirmation.sent:
        lines.append("Note: the server refused every test message, so relaying was not proven")
    if confirmation is not None and confirmation.sent:
        sent = len(confirmation.sent)
        if confirmation.arrived:
            lines.append(
                f"Relay confirmed: {len(confirmation.arrived)} of {sent} test messages arrived "
                f"({_names(confirmation.arrived)})"
            )
        else:
            lines.append(
                f"Relay not confirmed: none of {sent} test messages arrived "
                f"within {confirmation.wait_s:g} s"
            )
    if accepted and incomplete is not None:
        lines.append(f"Note: test incomplete: {incomplete}")
    if deferred:
        lines.append(
            f"Note: {len(deferred)} probes were deferred with a 4xx reply, a temporary refusal "
            f"({_names(deferred)})"
        )
    if errors and (accepted or incomplete is not None):
        lines.append(f"Note: {len(errors)} probes got no reply ({_names(errors)})")
    lines.extend(f"Note: {note}" for note in notes)
    result = verdict(probes, incomplete=incomplete, confirmation=confirmation)
    lines.append(in_plain_words(result, probes, confirmation=confirmation))
    return tuple(lines)


def in_plain_words(
    result: str, probes: Sequence[ProbeFinished], *, confirmation: Confirmation | None
) -> str:
    """The summary's last line: what verdict `result` means, readable without the transcript."""
    if result == "relayed":
        return (
            "Note: this is an open relay: it passed test messages on to a third party's domain; "
            "the user guide shows how to close it"
        )
    if result == "accepted":
        accepted = [p for p in probes if p.outcome is Outcome.ACCEPTED]
        proof = "only delivery proves relaying"
        if confirmation is None:
            proof += ", and delivery confirmation is off"
        elif confirmation.sent:
            proof += ", and no test message arrived"
        else:
            proof += ", and the server took no test message"
        if all(p.form is not AddressForm.PLAIN for p in accepted):
            forms = ", ".join(sorted({p.form.value for p in accepted}))
            return (
                f"Note: the {len(accepted)} accepted recipients use address forms ({forms}) that "
                f"qmail and some other servers accept and then bounce; {proof}"
            )
        return f"Note: the server accepted {len(accepted)} relay attempts at RCPT; {proof}"
    if result == "incomplete":
        return "Note: the test did not finish, so it says nothing yet about relaying"
    deferred = sum(p.outcome is Outcome.DEFERRED for p in probes)
    if deferred:
        return (
            f"Note: no relay attempt was accepted ({deferred} refused only for now, with 4xx): "
            "not an open relay to these probes"
        )
    return "Note: every relay attempt was refused: not an open relay to these probes"


# TLS as a word of its own: not part of a host name such as tls-gw.example.net.
_TLS_WORD = re.compile(r"(?<![\w.-])(?:STARTTLS|TLS)(?![\w.-])", re.IGNORECASE | re.ASCII)
# Addresses echoed in a refusal are the probe's own and may say anything.
_ECHOED_ADDRESS = re.compile(r"<[^<>]*>")


def asks_for_tls(code: int, text: str) -> bool:
    """Whether a refusal says the server wants STARTTLS first: 530 (RFC 3207), or a 4xx/5xx
    that names TLS outside the addresses it echoes (`454 4.7.0 TLS required`)."""
    if code == 530:
        return True
    # Most refusals don't mention TLS at all: a look for the letters is ten times cheaper than
    # the word rules.
    if code < 400 or "tls" not in text.lower():
        return False
    return _TLS_WORD.search(_ECHOED_ADDRESS.sub("", text)) is not None


def classify(code: int) -> Outcome:
    """The outcome of a probe from the code of its last reply (MAIL's if refused, else RCPT's)."""
    if 200 <= code < 300:
        return Outcome.ACCEPTED
    if 400 <= code < 500:
        return Outcome.DEFERRED
    return Outcome.REJECTED
