"""A finished relay test as one typed value: what the renderers, metrics and history receive."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from relayprobe.relaytest.events import Outcome, Summary
from relayprobe.reports.render import json_result

# 16 random bytes: 128 bits, well past guessing, 22 characters in a URL.
RESULT_ID_BYTES = 16


def new_result_id() -> str:
    """An unguessable id for a stored result, safe in a URL path and on a command line: never
    with a leading `-`, which `relayprobe history --show ID` would take for an option."""
    while (result_id := secrets.token_urlsafe(RESULT_ID_BYTES)).startswith("-"):
        pass
    return result_id


@dataclass(frozen=True, slots=True, kw_only=True)
class TestResult:
    """One finished test: its summary, the transcript kept for the record and its shareable id."""

    __test__ = False  # not a pytest test class, whatever its name

    summary: Summary
    transcript: tuple[str, ...]
    result_id: str | None = None
    """The unguessable id of the stored result, for its link; None when no history keeps it."""

    @property
    def target(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.summary.target)

    @property
    def verdict(self) -> str:
        return self.summary.verdict

    def count(self, *outcomes: Outcome) -> int:
        return sum(1 for probe in self.summary.probes if probe.outcome in outcomes)

    def to_json(self) -> dict[str, Any]:
        """The JSON result of the spec, with the result's `id` (null when not stored)."""
        return {"id": self.result_id, **json_result(self.summary, self.transcript)}
