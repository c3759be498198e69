"""What happens during a relay test, as small immutable values.

The engine emits these; renderers turn them into the telnet transcript, JSON or metrics.
Every string in an event is already sanitised.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from relayprobe.probes import AddressForm


class Outcome(StrEnum):
    REJECTED = "rejected"
    DEFERRED = "deferred"
    ACCEPTED = "accepted"
    RELAYED = "relayed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Connecting:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Sent:
    """A command line as it went out, without CRLF."""

    line: str


@dataclass(frozen=True, slots=True)
class Received:
    """One line of a server reply, sanitised, with its code and continuation mark."""

    line: str


@dataclass(frozen=True, slots=True)
class Progress:
    """A `:`-prefixed line: reconnects, notes on cut replies, waiting for relayed mail."""

    text: str


@dataclass(frozen=True, slots=True)
class ProbeStarted:
    name: str


@dataclass(frozen=True, slots=True)
class ProbeFinished:
    name: str
    mail_from: str
    rcpt_to: str
    outcome: Outcome
    reply: str
    form: AddressForm = AddressForm.PLAIN


@dataclass(frozen=True, slots=True)
class Relayed:
    """A test message of an accepted probe reached the canary sink."""

    name: str
    after_s: float
    source: str
    """The address that delivered it: the sink connection's peer."""


@dataclass(frozen=True, slots=True)
class Summary:
    """The end of a test: the summary block and the data behind the JSON result."""

    target: str
    host: str
    banner: str | None
    verdict: str
    lines: tuple[str, ...]
    probes: tuple[ProbeFinished, ...]
    started_at: float
    duration_s: float


Event = Connecting | Sent | Received | Progress | ProbeStarted | ProbeFinished | Relayed | Summary
