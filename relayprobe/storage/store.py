"""The result history in SQLite, under the state directory: the default, for one process.

`history.open_history` picks this or `pgstore.PostgresHistory`; `schema` holds what they share.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from relayprobe.storage.schema import (
    INSERT_COLUMNS,
    SCHEMA_VERSION,
    HistoryBackend,
    HistoryEntry,
    StoredRow,
    steps_due,
)

DATABASE_NAME = "history.sqlite3"


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock at once, waiting at most the busy timeout for it.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


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
    with _transaction(connection):
        steps = steps_due(_schema_version(connection))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for step in steps:
            step.sqlite(connection)
        connection.execute("DELETE FROM schema_version")
        connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


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


class HistoryStore(HistoryBackend):
    """`<state_dir>/history.sqlite3`, opened (and created or migrated) by the constructor.

    Raises sqlite3.Error or OSError when the database cannot be opened; a lock held elsewhere
    fails after `busy_timeout_s` instead of waiting. Use from the thread that opened it.
    """

    placeholder = "?"

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

    def _select(self, query: str, params: Sequence[object]) -> list[HistoryEntry]:
        return [_entry(row) for row in self._connection.execute(query, params)]

    def _execute(self, statement: str, params: Sequence[object]) -> int:
        return self._connection.execute(statement, params).rowcount

    def _stored_time(self, moment: datetime.datetime) -> str:
        # Fixed width and one time zone, so text order is time order for the prune.
        return moment.astimezone(datetime.UTC).isoformat(timespec="microseconds")

    def _insert(self, rows: Sequence[StoredRow]) -> list[int | None]:
        row_ids: list[int | None] = []
        with _transaction(self._connection):
            for row in rows:
                cursor = self._connection.execute(
                    f"INSERT INTO results ({INSERT_COLUMNS})"  # noqa: S608
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (public_id) DO NOTHING",
                    row.values(started_at=self._stored_time(row.started_at)),
                )
                row_ids.append(cursor.lastrowid if cursor.rowcount == 1 else None)
        return row_ids

    def close(self) -> None:
        self._connection.close()
