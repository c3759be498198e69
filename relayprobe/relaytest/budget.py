"""When to open a fresh SMTP session: before the tested server's own error limit bites. Pure.

Stock Postfix slows every reply down by a second after 10 errors in one session and drops the
client at 20; Exim drops it after 3 syntax or protocol errors. A relay test collects an error
per refused probe, so it opens a fresh session a little before either limit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class ErrorBudget:
    """The errors one SMTP session has collected, against what it may collect."""

    max_errors: int = 8
    max_syntax_errors: int = 2
    errors: int = 0
    syntax_errors: int = 0

    def record(self, code: int) -> None:
        """Count a reply: every 4xx and 5xx is an error, 500-504 also a syntax error."""
        if code >= 400:
            self.errors += 1
            if 500 <= code <= 504:
                self.syntax_errors += 1

    @property
    def spent(self) -> bool:
        return self.errors >= self.max_errors or self.syntax_errors >= self.max_syntax_errors

    def reset(self) -> None:
        """A fresh session starts with nothing counted."""
        self.errors = self.syntax_errors = 0
