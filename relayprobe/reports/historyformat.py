"""What `relayprobe history` prints: a table of stored tests, or one of them in full."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from relayprobe.relaytest.sanitize import sanitize_text
from relayprobe.storage.schema import COUNT_FIELDS, HistoryEntry

TABLE_HEADINGS = ("ID", "STARTED (UTC)", "TARGET", "VERDICT", "ACCEPTED", "DURATION")
_RIGHT_ALIGNED = frozenset({"ID", "ACCEPTED", "DURATION"})


def _started(entry: HistoryEntry) -> str:
    return entry.started_at.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table_row(entry: HistoryEntry) -> tuple[str, ...]:
    return (
        str(entry.id),
        _started(entry),
        sanitize_text(entry.target),
        sanitize_text(entry.verdict),
        str(entry.accepted),
        f"{entry.duration_s:.1f} s",
    )


def format_table(entries: Iterable[HistoryEntry]) -> list[str]:
    """The `relayprobe history` listing: a heading line, then one aligned line per entry."""
    rows = [TABLE_HEADINGS, *(_table_row(entry) for entry in entries)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_HEADINGS))]
    return [
        "  ".join(
            cell.rjust(width) if heading in _RIGHT_ALIGNED else cell.ljust(width)
            for heading, cell, width in zip(TABLE_HEADINGS, row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]


def _shown(result: Mapping[str, Any], key: str) -> str:
    # The stored JSON is shown to a terminal: the file may have been edited since it was written.
    return sanitize_text(str(result.get(key, "?")))


def format_entry(entry: HistoryEntry) -> list[str]:
    """`relayprobe history --show ID`: header lines, a blank line, the stored transcript."""
    result = entry.result
    counts = ", ".join(f"{_shown(result, key)} {key}" for key in COUNT_FIELDS)
    transcript = result.get("transcript")
    lines = transcript if isinstance(transcript, list) else []
    return [
        f"Test #{entry.id} of {sanitize_text(entry.target)} ({_shown(result, 'host')})",
        f"Public ID: {sanitize_text(entry.public_id)}",
        f"Started:   {_started(entry)} UTC, took {entry.duration_s:.1f} s",
        f"Banner:    {_shown(result, 'banner')}",
        f"Verdict:   {sanitize_text(entry.verdict)} ({counts})",
        "",
        *(sanitize_text(str(line)) for line in lines),
    ]
