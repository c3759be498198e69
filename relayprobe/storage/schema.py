"""What both history backends share: the stored entry, the rules every backend keeps (in
`HistoryBackend`), the row a result becomes, and one list of schema migrations.

`store.HistoryStore` keeps the history in SQLite, `pgstore.PostgresHistory` in PostgreSQL; they
hold the same table with the same columns, in each engine's types:

    column                  SQLite                             PostgreSQL
    id                      INTEGER PRIMARY KEY AUTOINCREMENT  BIGINT GENERATED ALWAYS AS IDENTITY
    public_id               TEXT, unique index                 TEXT NOT NULL, unique constraint
    started_at              TEXT: ISO 8601 in UTC, to the µs   TIMESTAMPTZ
    target, verdict         TEXT                               TEXT
    accepted ... errors     INTEGER                            INTEGER
    duration_s              REAL                               DOUBLE PRECISION
    result                  TEXT holding JSON                  JSONB (keys come back reordered)

and the same indexes (results_target_id, results_started_at, results_public_id) and a
`schema_version` table of one row. Each step of `MIGRATIONS` is written once for each engine.
"""

from __future__ import annotations

import abc
import datetime
import ipaddress
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from relayprobe.reports.result import TestResult, new_result_id

if TYPE_CHECKING:
    import psycopg

COUNT_FIELDS = ("accepted", "relayed", "deferred", "rejected", "errors")

# What `new_result_id` makes: 16 bytes in URL-safe base64 without padding. The last of the 22
# characters holds 2 bits, so only A, Q, g or w can end one; an all-digit ID is a row number.
_PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
# Both engines' integers are 64-bit: a larger row number names no row (and would not bind).
MAX_ROW_ID = 2**63 - 1

# Constants put into SQL (hence the noqa there): no outside text reaches it.
ENTRY_COLUMNS = "id, public_id, started_at, target, verdict, accepted, duration_s, result"
INSERT_COLUMNS = (
    "public_id, started_at, target, verdict, accepted, relayed, deferred, rejected, errors,"
    " duration_s, result"
)


class HistorySchemaError(ValueError):
    """The database was written by a newer relayprobe, with a schema this one does not know."""


class DuplicateResultError(ValueError):
    """A result with this public ID is stored already."""


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


@dataclass(frozen=True, slots=True)
class StoredRow:
    """The column values of one result, checked: what both backends insert."""

    public_id: str
    started_at: datetime.datetime
    target: str
    verdict: str
    counts: tuple[int, ...]
    """In the order of COUNT_FIELDS."""
    duration_s: float
    document: str
    """The JSON result, with its public ID as `id`."""

    def values(self, *, started_at: object) -> tuple[object, ...]:
        """The values in the order of INSERT_COLUMNS, with `started_at` as the engine stores it."""
        return (
            self.public_id,
            started_at,
            self.target,
            self.verdict,
            *self.counts,
            self.duration_s,
            self.document,
        )


def stored_row(result: TestResult) -> StoredRow:
    """The row for `result`, with a new public ID if it has none yet; ValueError if the result
    cannot be stored (a target that is not an address, a malformed ID, a NaN)."""
    public_id = new_result_id() if result.result_id is None else result.result_id
    if _PUBLIC_ID.fullmatch(public_id) is None:
        raise ValueError(f"result ID {public_id!r} was not made by new_result_id")
    document = {**result.to_json(), "id": public_id}
    summary = result.summary
    return StoredRow(
        public_id=public_id,
        started_at=datetime.datetime.fromtimestamp(summary.started_at, datetime.UTC),
        target=str(result.target),
        verdict=result.verdict,
        counts=tuple(document[key] for key in COUNT_FIELDS),
        duration_s=summary.duration_s,
        document=json.dumps(document, allow_nan=False),
    )


def normalise_address(address: str) -> str:
    """The canonical text of an IP address (`2001:DB8::4` -> `2001:db8::4`); ValueError if none."""
    return str(ipaddress.ip_address(address))


def _cutoff(now: datetime.datetime, days: float) -> datetime.datetime:
    """The start time before which a test is more than `days` old at `now`."""
    if now.tzinfo is None:
        raise ValueError(f"time {now.isoformat()} has no time zone")
    return now - datetime.timedelta(days=days)


class HistoryBackend(abc.ABC):
    """The history in one engine: the checks and queries here, the driver in each backend.

    Use from one thread at a time. Every call is bounded by the backend's timeouts and raises
    the engine's errors (`history.history_errors()`) when the database fails.
    """

    placeholder: ClassVar[str]
    """How the engine's driver marks a parameter in SQL: `?` for sqlite3, `%s` for psycopg."""

    def __enter__(self) -> Self:
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
        JSON. Raises ValueError for a result that cannot be stored (see `stored_row`), and
        DuplicateResultError (a ValueError) for a public ID already stored.
        """
        (outcome,) = self.save_batch([result])
        if isinstance(outcome, ValueError):
            raise outcome
        return outcome

    def save_batch(self, results: Sequence[TestResult]) -> list[int | ValueError]:
        """Store `results` in one transaction; for each, its row number or the ValueError that
        kept it out (as `save` raises). A database failure raises, and stores none of them."""
        rows = [_row_or_error(result) for result in results]
        checked = [row for row in rows if isinstance(row, StoredRow)]
        row_ids = iter(self._insert(checked) if checked else [])
        outcomes: list[int | ValueError] = []
        for row in rows:
            if isinstance(row, ValueError):
                outcomes.append(row)
            elif (row_id := next(row_ids)) is None:
                outcomes.append(
                    DuplicateResultError(f"a result with public ID {row.public_id} is stored")
                )
            else:
                outcomes.append(row_id)
        return outcomes

    def recent(self, *, address: str | None = None, limit: int = 20) -> list[HistoryEntry]:
        """The latest `limit` entries, newest first, only those of `address` if given."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        mark = self.placeholder
        if address is None:
            return self._select(
                f"SELECT {ENTRY_COLUMNS} FROM results ORDER BY id DESC LIMIT {mark}",  # noqa: S608
                (limit,),
            )
        return self._select(
            f"SELECT {ENTRY_COLUMNS} FROM results WHERE target = {mark}"  # noqa: S608
            f" ORDER BY id DESC LIMIT {mark}",
            (normalise_address(address), limit),
        )

    def get(self, entry_id: int) -> HistoryEntry | None:
        """The entry with this row number, pruned or not; None if there is none."""
        if not 1 <= entry_id <= MAX_ROW_ID:
            return None
        found = self._select(
            f"SELECT {ENTRY_COLUMNS} FROM results WHERE id = {self.placeholder}",  # noqa: S608
            (entry_id,),
        )
        return found[0] if found else None

    def by_public_id(
        self, public_id: str, *, now: datetime.datetime, retention_days: float
    ) -> HistoryEntry | None:
        """The entry a shared link names; None if the ID is unknown or malformed, or if the test
        started more than `retention_days` before `now` (expired, even before the prune)."""
        if _PUBLIC_ID.fullmatch(public_id) is None:
            return None
        mark = self.placeholder
        found = self._select(
            f"SELECT {ENTRY_COLUMNS} FROM results"  # noqa: S608
            f" WHERE public_id = {mark} AND started_at >= {mark}",
            (public_id, self._stored_time(_cutoff(now, retention_days))),
        )
        return found[0] if found else None

    def prune(self, *, older_than_days: float, now: datetime.datetime) -> int:
        """Delete the tests started more than `older_than_days` before `now`; return how many."""
        return self._execute(
            f"DELETE FROM results WHERE started_at < {self.placeholder}",  # noqa: S608
            (self._stored_time(_cutoff(now, older_than_days)),),
        )

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _insert(self, rows: Sequence[StoredRow]) -> list[int | None]:
        """Insert `rows` (at least one) in one transaction: each one's row number, or None
        where its public ID is stored already (then that row is left out)."""

    @abc.abstractmethod
    def _select(self, query: str, params: Sequence[object]) -> list[HistoryEntry]:
        """The entries a SELECT of ENTRY_COLUMNS finds."""

    @abc.abstractmethod
    def _execute(self, statement: str, params: Sequence[object]) -> int:
        """Run a statement that changes rows; how many it changed."""

    @abc.abstractmethod
    def _stored_time(self, moment: datetime.datetime) -> object:
        """An aware time as the engine stores `started_at`."""


def _row_or_error(result: TestResult) -> StoredRow | ValueError:
    try:
        return stored_row(result)
    except ValueError as exc:
        return exc


# Migrations: step n brings schema version n to n + 1, in each engine. Append steps, never edit
# one that has shipped.


# The first version's table, with the types that differ between the engines left open.
_RESULTS_TABLE = """CREATE TABLE results (
    id {row_id},
    started_at {time} NOT NULL,
    target TEXT NOT NULL,
    verdict TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    relayed INTEGER NOT NULL,
    deferred INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    duration_s {real} NOT NULL,
    result {json} NOT NULL
)"""
_RESULTS_INDEXES = (
    "CREATE INDEX results_target_id ON results (target, id)",
    "CREATE INDEX results_started_at ON results (started_at)",
)


def _create_results_sqlite(connection: sqlite3.Connection) -> None:
    # AUTOINCREMENT: an ID shown to an operator must never name a different test after a prune.
    # Times are fixed-width ISO 8601 text in UTC, so that text order is time order.
    connection.execute(
        _RESULTS_TABLE.format(
            row_id="INTEGER PRIMARY KEY AUTOINCREMENT", time="TEXT", real="REAL", json="TEXT"
        )
    )
    for statement in _RESULTS_INDEXES:
        connection.execute(statement)


def _create_results_postgres(connection: psycopg.Connection[Any]) -> None:
    # An identity, like AUTOINCREMENT, never hands out a number twice.
    connection.execute(
        _RESULTS_TABLE.format(
            row_id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            time="TIMESTAMPTZ",
            real="DOUBLE PRECISION",
            json="JSONB",
        )
    )
    for statement in _RESULTS_INDEXES:
        connection.execute(statement)


def _add_public_ids_sqlite(connection: sqlite3.Connection) -> None:
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


def _add_public_ids_postgres(connection: psycopg.Connection[Any]) -> None:
    # As in SQLite; the column can be NOT NULL here once every row has its ID.
    connection.execute(
        "ALTER TABLE results ADD COLUMN public_id TEXT CONSTRAINT results_public_id UNIQUE"
    )
    row_ids = [row_id for (row_id,) in connection.execute("SELECT id FROM results")]
    with connection.cursor() as cursor:
        cursor.executemany(
            "UPDATE results SET public_id = %(public_id)s, result = CASE"
            " WHEN jsonb_typeof(result) = 'object'"
            " THEN jsonb_set(result, '{id}', to_jsonb(%(public_id)s::text)) ELSE result END"
            " WHERE id = %(id)s",
            [{"public_id": new_result_id(), "id": row_id} for row_id in row_ids],
        )
    connection.execute("ALTER TABLE results ALTER COLUMN public_id SET NOT NULL")


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema, from version n to n + 1, written once for each engine."""

    sqlite: Callable[[sqlite3.Connection], None]
    postgres: Callable[[psycopg.Connection[Any]], None]


MIGRATIONS = (
    Migration(sqlite=_create_results_sqlite, postgres=_create_results_postgres),
    Migration(sqlite=_add_public_ids_sqlite, postgres=_add_public_ids_postgres),
)
SCHEMA_VERSION = len(MIGRATIONS)


def steps_due(version: int) -> tuple[Migration, ...]:
    """The steps that bring a database at `version` up to date; none if it is.

    Raises HistorySchemaError for a version newer than this relayprobe's.
    """
    if version > SCHEMA_VERSION:
        raise HistorySchemaError(
            f"history schema version {version} is newer than this relayprobe's {SCHEMA_VERSION}"
        )
    return MIGRATIONS[version:]
