"""What happens during a relay test, as small immutable values.

The engine emits these; renderers turn them into the telnet transcript, JSON or metrics.
Every string in an event is already sanitised.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from relayprobe.relaytest.probes import AddressForm


class Outcome(StrEnum):
    REJECTED = "rejected"
    DEFERRED = "deferred"
    ACCEPTED = "accepted"
    RELAYED = "relayed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ServiceMessage:
    """Lines from the service itself, not the test: the message of the day, a shutdown notice."""

    lines: tuple[str, ...]


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
    """A server reply as shown: each line sanitised, with its code and continuation mark."""

    lines: tuple[str, ...]


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
    tls: bool = False
    """Whether the probe ran over TLS."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """The tested server's certificate, sanitised; never verified."""

    subject: str
    issuer: str
    not_after: str
    """The last day it is valid, ISO 8601."""
    self_signed: bool


@dataclass(frozen=True, slots=True)
class TlsStarted:
    """STARTTLS succeeded: what was negotiated (values sanitised)."""

    version: str
    cipher: str
    certificate: Certificate | None


@dataclass(frozen=True, slots=True)
class Greeted:
    """The server's first greeting, sanitised, and the host name it gives, if any."""

    banner: str
    host_name: str | None


@dataclass(frozen=True, slots=True)
class TlsOffered:
    """EHLO listed STARTTLS."""


@dataclass(frozen=True, slots=True)
class TlsDemanded:
    """The server refused MAIL or RCPT until STARTTLS."""

    code: int


@dataclass(frozen=True, slots=True)
class TlsUnused:
    """TLS could not be used: STARTTLS refused, or its handshake failed."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConfirmationEnded:
    """The wait for test messages is over; `Relayed` events said which arrived."""

    sent: tuple[str, ...]
    """Probes whose test message the tested server took."""
    wait_s: float


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a `Note:` line in the summary."""

    text: str


@dataclass(frozen=True, slots=True)
class RelayTestEnded:
    """The last event before the summary: how the test ended, and what it tested."""

    incomplete: str | None
    """Why the test could not finish; None when it did."""
    host: str
    """The tested host's name: its PTR name, the name in its banner, or its address."""
    started_at: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class TlsReport:
    """What the test found out about the server's TLS."""

    offered: bool
    """EHLO listed STARTTLS."""
    required: bool
    """The server refused MAIL or RCPT until STARTTLS."""
    used: TlsStarted | None
    """The TLS the probes last ran over, if any."""


NO_TLS = TlsReport(offered=False, required=False, used=None)


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
    tls: TlsReport = NO_TLS


Event = (
    ServiceMessage
    | Connecting
    | Greeted
    | Sent
    | Received
    | Progress
    | ProbeStarted
    | ProbeFinished
    | TlsOffered
    | TlsDemanded
    | TlsStarted
    | TlsUnused
    | Relayed
    | ConfirmationEnded
    | Note
    | RelayTestEnded
    | Summary
)
