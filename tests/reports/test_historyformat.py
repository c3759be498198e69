from __future__ import annotations

import dataclasses
import datetime

from relayprobe.reports.historyformat import format_entry, format_table
from relayprobe.reports.result import TestResult
from relayprobe.storage.store import HistoryEntry
from tests.storage.test_store import NOW, make_result

PUBLIC_ID = "kG2uNb8yq0pBkV3aS1-_xA"


def make_entry(entry_id: int, result: TestResult) -> HistoryEntry:
    """The entry the store would read back for `result` saved as row `entry_id`."""
    return HistoryEntry(
        id=entry_id,
        public_id=PUBLIC_ID,
        started_at=datetime.datetime.fromtimestamp(result.summary.started_at, datetime.UTC),
        target=str(result.target),
        verdict=result.verdict,
        accepted=result.to_json()["accepted"],
        duration_s=result.summary.duration_s,
        result={**result.to_json(), "id": PUBLIC_ID},
    )


def test_format_table_aligns_columns() -> None:
    entries = [
        make_entry(12, make_result(target="2001:db8::4", verdict="accepted", accepted=12)),
        make_entry(9, make_result(started_at=NOW - datetime.timedelta(days=1, seconds=1))),
    ]

    assert format_table(entries) == [
        "ID  STARTED (UTC)        TARGET       VERDICT   ACCEPTED  DURATION",
        "12  2026-11-29 18:00:00  2001:db8::4  accepted        12     0.4 s",
        " 9  2026-11-28 17:59:59  192.0.2.4    rejected         0     0.4 s",
    ]
    assert format_table([]) == [
        "ID  STARTED (UTC)  TARGET  VERDICT  ACCEPTED  DURATION",
    ]


def test_format_entry_shows_a_header_then_the_transcript() -> None:
    shown = make_entry(3, make_result(accepted=2, transcript_lines=2))

    assert format_entry(shown) == [
        "Test #3 of 192.0.2.4 (mail.example.com)",
        "Public ID: kG2uNb8yq0pBkV3aS1-_xA",
        "Started:   2026-11-29 18:00:00 UTC, took 0.4 s",
        "Banner:    220 mail.example.com ESMTP",
        "Verdict:   rejected (2 accepted, 0 relayed, 18 deferred, 0 rejected, 0 errors)",
        "",
        "<<< 250 line 0",
        "<<< 250 line 1",
    ]


def test_format_entry_escapes_what_a_terminal_would_act_on() -> None:
    entry = make_entry(3, make_result())
    entry.result["banner"] = "220 \x1b]0;owned\x07"
    entry.result["transcript"] = ["<<< 250 \x1b[2J"]
    shown = dataclasses.replace(entry, public_id="\x1b[31m")

    lines = format_entry(shown)

    assert lines[1] == "Public ID: \\x1b[31m"
    assert lines[3] == "Banner:    220 \\x1b]0;owned\\x07"
    assert lines[-1] == "<<< 250 \\x1b[2J"
