"""The result history: finished relay tests in SQLite, for one thread.

The service saves through `historywriter.HistoryWriter`; `historyformat` shows entries to the CLI.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from relayprobe.reports.result import TestResult, new_result_id

DATABASE_NAME = "history.sqlite3"


class HistorySchemaError(sqlite3.DatabaseError):
    """The database was written by a newer relayprobe, with a schema this one does not know."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored test; `result` is its JSON result, transcript included."""

    id: int
    public_id: str
    """The unguessable id of its shareable link (`result.new_result_id`), not the row number."""
    started_at: datetime.datetime
    target: str
    verdict: str
    accepted: int
    duration_s: float
    result: dict[str, Any]


def _create_results(connection: sqlite3.Connection) -> None:
    # AUTOINCREMENT: an ID shown to an operator must never name a different test after a prune.
    connection.execute(
        """CREATE TABLE results (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            started_at TEXT NOT NULL,
            target TEXT NOT NULL,
            verdict TEXT NOT NULL,
            accepted INTEGER NOT NULL,
            relayed INTEGER NOT NULL,
            deferred INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            duration_s REAL NOT NULL,
            result TEXT NOT NULL
        )"""
    )
    connection.execute("CREATE INDEX results_target_id ON results (target, id)")
    connection.execute("CREATE INDEX results_started_at ON results (started_at)")


def _add_public_ids(connection: sqlite3.Connection) -> None:
    # SQLite cannot add a UNIQUE column: a unique index is the same constraint. The stored JSON
    # gets its id too, as `save` writes it; a document that is not JSON is left as it is.
    connection.execute("ALTER TABLE results ADD COLUMN public_id TEXT")
    row_ids = [row_id for (row_id,) in connection.execute("SELECT id FROM results")]
    connection.executemany(
        "UPDATE results SET public_id = ?1, result = CASE WHEN json_valid(result)"
        " THEN json_set(result, '$.id', ?1) ELSE result END WHERE id = ?2",
        ((new_result_id(), row_id) for row_id in row_ids),
    )
    connection.execute("CREATE UNIQUE INDEX results_public_id ON results (public_id)")


# Step n brings schema version n to n + 1; append steps, never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_results, _add_public_ids)
SCHEMA_VERSION = len(MIGRATIONS)


def _schema_version(connection: sqlite3.Connection) -> int:
    table = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if table is None:
        return 0
    row = connection.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _migrate(connection: sqlite3.Connection) -> None:
    # Only reads unless a step is due: an up-to-date database opens while another connection
    # holds the write lock.
    if _schema_version(connection) == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(connection)
        if version > SCHEMA_VERSION:
            raise HistorySchemaError(
                f"history schema version {version} is newer than this relayprobe's {SCHEMA_VERSION}"
            )
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for step in MIGRATIONS[version:]:
            step(connection)
        connection.execute("DELETE FROM schema_version")
        connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def normalise_address(address: str) -> str:
    """The canonical text of an IP address (`2001:DB8::4` -> `2001:db8::4`); ValueError if none."""
    return str(ipaddress.ip_address(address))


def _utc_text(moment: datetime.datetime) -> str:
    # Fixed width and one time zone, so text order is time order for the prune.
    if moment.tzinfo is None:
        raise ValueError(f"time {moment.isoformat()} has no time zone")
    return moment.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def _cutoff(now: datetime.datetime, retention_days: float) -> str:
    """The start time before which a test is past the retention."""
    return _utc_text(now - datetime.timedelta(days=retention_days))


# What `new_result_id` makes: 16 bytes in URL-safe base64 without padding. The last of the 22
# characters holds 2 bits, so only A, Q, g or w can end one; an all-digit ID is a row number.
_PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
# SQLite's integers are 64-bit: a larger row number names no row (and would not bind).
_MAX_ROW_ID = 2**63 - 1

COUNT_FIELDS = ("accepted", "relayed", "deferred", "rejected", "errors")


def _row(result: TestResult) -> tuple[str | int | float, ...]:
    """The column values for `result`, with a new public ID if it has none yet."""
    public_id = new_result_id() if result.result_id is None else result.result_id
    if _PUBLIC_ID.fullmatch(public_id) is None:
        raise ValueError(f"result ID {public_id!r} was not made by new_result_id")
    document = {**result.to_json(), "id": public_id}
    summary = result.summary
    return (
        public_id,
        _utc_text(datetime.datetime.fromtimestamp(summary.started_at, datetime.UTC)),
        str(result.target),
        result.verdict,
        *(document[key] for key in COUNT_FIELDS),
        summary.duration_s,
        json.dumps(document, allow_nan=False),
    )


# A constant put into the SELECTs below (hence their noqa): no outside text reaches SQL.
_ENTRY_COLUMNS = "id, public_id, started_at, target, verdict, accepted, duration_s, result"


def _entry(row: tuple[Any, ...]) -> HistoryEntry:
    entry_id, public_id, started_at, target, verdict, accepted, duration_s, document = row
    return HistoryEntry(
        id=entry_id,
        public_id=public_id,
        started_at=datetime.datetime.fromisoformat(started_at),
        target=target,
        verdict=verdict,
        accepted=accepted,
        duration_s=duration_s,
        result=json.loads(document),
    )


class HistoryStore:
    """`<state_dir>/history.sqlite3`, opened (and created or migrated) by the constructor.

    Raises sqlite3.Error or OSError when the database cannot be opened; a lock held elsewhere
    fails after `busy_timeout_s` instead of waiting. Use from one thread.
    """

    def __init__(self, state_dir: Path | str, *, busy_timeout_s: float = 0.2) -> None:
        directory = Path(state_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / DATABASE_NAME
        # Autocommit: each statement is its own transaction unless a BEGIN says otherwise.
        self._connection = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL can lose the last commits on power loss but never corrupts.
            self._connection.execute("PRAGMA synchronous=NORMAL")
            _migrate(self._connection)
        except BaseException:
            self._connection.close()
            raise

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def save(self, result: TestResult) -> int:
        """Store `result` and return its row number.

        Its `result_id` becomes the public ID (a new one when it has none), also in the stored
        JSON. Raises ValueError for a result that cannot be stored (a target that is not an
        address, a malformed ID, a NaN), sqlite3.IntegrityError for a public ID already stored.
        """
        cursor = self._connection.execute(
            "INSERT INTO results (public_id, started_at, target, verdict, accepted, relayed,"
            " deferred, rejected, errors, duration_s, result)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _row(result),
        )
        assert cursor.lastrowid is not None  # an INSERT always sets it
        return cursor.lastrowid

    def recent(self, *, address: str | None = None, limit: int = 20) -> list[HistoryEntry]:
        """The latest `limit` entries, newest first, only those of `address` if given."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if address is None:
            rows = self._connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM results ORDER BY id DESC LIMIT ?",  # noqa: S608
                (limit,),
            )
        else:
            rows = self._connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM results WHERE target = ?"  # noqa: S608
                " ORDER BY id DESC LIMIT ?",
                (normalise_address(address), limit),
            )
        return [_entry(row) for row in rows]

    def get(self, entry_id: int) -> HistoryEntry | None:
        """The entry with this row number, pruned or not; None if there is none."""
        if not 1 <= entry_id <= _MAX_ROW_ID:
            return None
        row = self._connection.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM results WHERE id = ?",  # noqa: S608
            (entry_id,),
        ).fetchone()
        return None if row is None else _entry(row)

    def by_public_id(
        self, public_id: str, *, now: datetime.datetime, retention_days: float
    ) -> HistoryEntry | None:
        """The entry a shared link names; None if the ID is unknown or malformed, or if the test
        started more than `retention_days` before `now` (expired, even before the prune)."""
        if _PUBLIC_ID.fullmatch(public_id) is None:
            return None
        row = self._connection.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM results"  # noqa: S608
            " WHERE public_id = ? AND started_at >= ?",
            (public_id, _cutoff(now, retention_days)),
        ).fetchone()
        return None if row is None else _entry(row)

    def prune(self, *, older_than_days: float, now: datetime.datetime) -> int:
        """Delete the tests started more than `older_than_days` before `now`; return how many."""
        cursor = self._connection.execute(
            "DELETE FROM results WHERE started_at < ?", (_cutoff(now, older_than_days),)
        )
        return cursor.rowcount

    def close(self) -> None:
        self._connection.close()
