"""The result history in PostgreSQL, shared by every replica of the service.

The driver is psycopg 3: kept by the PostgreSQL community's psycopg team, sync and async APIs in
one package, binary wheels, and parameters bound by the server, never spliced into SQL. This
backend uses the sync API: the history writer calls it on a thread of its own, and the web
door's lookups go through `asyncio.to_thread`, so it never blocks the event loop and one
implementation of each query serves the writer, the lookups and `relayprobe history`.

Every call is bounded: `connect_timeout` for the connection, and for each session
`statement_timeout` and `lock_timeout` (set when it opens), and `tcp_user_timeout` for a server
that has vanished from the network. The schema is migrated when a connection opens, under a
transaction-level advisory lock, so that replicas starting together take turns.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import psycopg

from relayprobe.storage.schema import (
    INSERT_COLUMNS,
    SCHEMA_VERSION,
    HistoryBackend,
    HistoryEntry,
    StoredRow,
    steps_due,
)

# Any constant, the same in every relayprobe: the advisory lock that serialises migrations.
MIGRATION_LOCK = 0x72656C6179707262  # "relayprb"
# A migration may wait for another replica's, and may rewrite the table: longer bounds.
MIGRATION_TIMEOUT_S = 60.0


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _schema_version(connection: psycopg.Connection[Any]) -> int:
    # A scan of the catalog, not to_regclass: that reads a cache which taking an advisory lock
    # does not refresh, and would miss a table another replica has just created.
    table = connection.execute(
        "SELECT 1 FROM pg_catalog.pg_tables"
        " WHERE schemaname = current_schema() AND tablename = 'schema_version'"
    ).fetchone()
    if table is None:
        return 0
    row = connection.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _migrate(connection: psycopg.Connection[Any]) -> None:
    # Only reads unless a step is due; then the lock, and a second look under it: another
    # replica may have migrated while this one waited.
    if _schema_version(connection) == SCHEMA_VERSION:
        return
    with connection.transaction():
        connection.execute(
            "SELECT set_config('lock_timeout', %(ms)s, true),"
            " set_config('statement_timeout', %(ms)s, true)",
            {"ms": _milliseconds(MIGRATION_TIMEOUT_S)},
        )
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        steps = steps_due(_schema_version(connection))
        if not steps:
            return
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for step in steps:
            step.postgres(connection)
        connection.execute("DELETE FROM schema_version")
        connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))


class PostgresHistory(HistoryBackend):
    """The history in the PostgreSQL database at `url`, connected (and the schema created or
    migrated) by the constructor.

    Raises psycopg.Error when the database cannot be reached or used: OperationalError when
    it is unreachable, slow or locked past the timeouts. `connect_timeout_s` is whole seconds,
    at least 2, as libpq counts it.
    """

    placeholder = "%s"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: int = 5,
        statement_timeout_s: float = 5.0,
        lock_timeout_s: float = 1.0,
    ) -> None:
        self._connection = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=connect_timeout_s,
            tcp_user_timeout=_milliseconds(connect_timeout_s + statement_timeout_s),
            application_name="relayprobe",
        )
        try:
            # Per session, so that a pooler or a server default cannot loosen the bounds; UTC,
            # so that times come back as SQLite's do.
            self._connection.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false), set_config('TimeZone', 'UTC', false)",
                (_milliseconds(statement_timeout_s), _milliseconds(lock_timeout_s)),
            )
            _migrate(self._connection)
        except BaseException:
            self._connection.close()
            raise

    def _insert(self, rows: Sequence[StoredRow]) -> list[int | None]:
        row_ids: list[int | None] = []
        with self._connection.transaction(), self._connection.cursor() as cursor:
            # In one pipeline: one round trip for the batch, one result set per row.
            cursor.executemany(
                f"INSERT INTO results ({INSERT_COLUMNS})"  # noqa: S608
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
                " ON CONFLICT (public_id) DO NOTHING RETURNING id",
                [row.values(started_at=row.started_at) for row in rows],
                returning=True,
            )
            while True:
                inserted = cursor.fetchone()
                row_ids.append(None if inserted is None else int(inserted[0]))
                if not cursor.nextset():
                    break
        return row_ids

    def _select(self, query: str, params: Sequence[object]) -> list[HistoryEntry]:
        # The columns' types are the entry's: TIMESTAMPTZ is an aware datetime, JSONB a dict.
        return [HistoryEntry(*row) for row in self._connection.execute(query, params)]

    def _execute(self, statement: str, params: Sequence[object]) -> int:
        return self._connection.execute(statement, params).rowcount

    def _stored_time(self, moment: datetime.datetime) -> datetime.datetime:
        return moment

    def close(self) -> None:
        self._connection.close()
