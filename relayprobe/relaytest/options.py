"""What one relay test is asked to do: plain data, shared by the settings and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from relayprobe.relaytest.probes import CLASSIC, Probe


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayTestOptions:
    port: int = 25
    suite: tuple[Probe, ...] = CLASSIC
    helo_name: str = "relayprobe.invalid"
    test_domain: str = "relaytest.invalid"
    foreign_domain: str = "example.net"
    connect_timeout: float = 10.0
    reply_timeout: float = 30.0
    deadline: float = 300.0
    rdns_timeout: float = 2.0
    # Stock Postfix slows down after 10 errors and drops at 20; Exim drops after 3 syntax errors.
    max_errors_per_session: int = 8
    max_syntax_errors_per_session: int = 2
    confirm_wait: float = 30.0
    starttls: str = "auto"
    """`auto`: plaintext, STARTTLS when the server requires it; `always`: STARTTLS whenever
    offered; `never`."""
    operator: str = "relayprobe"
    """Who runs the test, named in the body of the test messages."""
    notes: tuple[str, ...] = ()
    """Extra `Note:` lines for the summary, from the caller."""
