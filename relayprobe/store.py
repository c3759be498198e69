"""The result history: finished relay tests in SQLite, and the service's non-blocking writer.

`HistoryStore` is plain synchronous SQLite for one thread. `HistoryWriter` puts it behind a bounded
queue and a background thread, so a slow, locked or full disk costs the service a log line, never
a stalled event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from relayprobe.sanitize import sanitize_text

DATABASE_NAME = "history.sqlite3"


class HistorySchemaError(sqlite3.DatabaseError):
    """The database was written by a newer relayprobe, with a schema this one does not know."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored test; `result` is its JSON result, transcript included."""

    id: int
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


# Step n brings schema version n to n + 1; append steps, never edit one that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_results,)
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


def _text_field(result: Mapping[str, Any], key: str) -> str:
    value = result.get(key)
    if not isinstance(value, str):
        raise ValueError(f"result field {key!r} must be text, got {value!r}")
    return value


def _count_field(result: Mapping[str, Any], key: str) -> int:
    value = result.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"result field {key!r} must be a count, got {value!r}")
    return value


COUNT_FIELDS = ("accepted", "relayed", "deferred", "rejected", "errors")


def _row(result: Mapping[str, Any]) -> tuple[str | int | float, ...]:
    """The column values for `result`; ValueError if a field is missing or of the wrong kind."""
    duration_s = result.get("duration_s")
    if isinstance(duration_s, bool) or not isinstance(duration_s, int | float):
        raise ValueError(f"result field 'duration_s' must be a number, got {duration_s!r}")
    try:
        document = json.dumps(dict(result), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"result is not JSON: {exc}") from None
    return (
        _utc_text(datetime.datetime.fromisoformat(_text_field(result, "started_at"))),
        normalise_address(_text_field(result, "target")),
        _text_field(result, "verdict"),
        *(_count_field(result, key) for key in COUNT_FIELDS),
        float(duration_s),
        document,
    )


# A constant put into the SELECTs below (hence their noqa): no outside text reaches SQL.
_ENTRY_COLUMNS = "id, started_at, target, verdict, accepted, duration_s, result"


def _entry(row: tuple[Any, ...]) -> HistoryEntry:
    entry_id, started_at, target, verdict, accepted, duration_s, document = row
    return HistoryEntry(
        id=entry_id,
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

    def save(self, result: Mapping[str, Any]) -> int:
        """Store a JSON result (see `render.json_result`) and return its ID."""
        cursor = self._connection.execute(
            "INSERT INTO results (started_at, target, verdict, accepted, relayed, deferred,"
            " rejected, errors, duration_s, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        row = self._connection.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM results WHERE id = ?",  # noqa: S608
            (entry_id,),
        ).fetchone()
        return None if row is None else _entry(row)

    def prune(self, *, older_than_days: float, now: datetime.datetime) -> int:
        """Delete the tests started more than `older_than_days` before `now`; return how many."""
        cutoff = now - datetime.timedelta(days=older_than_days)
        cursor = self._connection.execute(
            "DELETE FROM results WHERE started_at < ?", (_utc_text(cutoff),)
        )
        return cursor.rowcount

    def close(self) -> None:
        self._connection.close()


class HistoryWriter:
    """Saves results on a background thread; `submit` never blocks and only `start` raises.

    `start` opens the database and prunes it to `retention_days`, and raises if it can't create
    or write it. After that, failures (locked database, full disk, bad result) are logged and the
    result is dropped; the database is pruned every `prune_interval_s`, and if it cannot be opened,
    each later result tries again.
    """

    def __init__(
        self,
        *,
        state_dir: Path | str,
        retention_days: float = 90.0,
        queue_size: int = 256,
        prune_interval_s: float = 3600.0,
        stop_timeout_s: float = 5.0,
        busy_timeout_s: float = 0.2,
    ) -> None:
        if retention_days <= 0:
            raise ValueError(f"retention_days must be above 0, got {retention_days}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self._state_dir = Path(state_dir)
        self._retention_days = retention_days
        self._prune_interval_s = prune_interval_s
        self._stop_timeout_s = stop_timeout_s
        self._busy_timeout_s = busy_timeout_s
        # None is the stop sentinel; it wakes the thread when it is waiting for work.
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relayprobe-history", daemon=True)
        self._store: HistoryStore | None = None
        # A logger of its own, bound on first use, so it follows the configuration of that time.
        self._log = structlog.get_logger()

    def submit(self, result: Mapping[str, Any]) -> None:
        """Queue `result` for saving; the writer owns it from now on, so don't change it."""
        if self._stopping.is_set():
            self._log.warning("history.dropped", reason="writer stopped", target=_target(result))
            return
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self._log.warning("history.dropped", reason="queue full", target=_target(result))

    async def start(self) -> None:
        """Prune now, then save in the background.

        Raises sqlite3.Error or OSError when the database can't be created or written, so that a
        service doesn't run with a history that can only fail. A lock held elsewhere is no such
        proof: it is logged, and the writer starts.
        """
        await asyncio.to_thread(self._first_prune)
        self._thread.start()

    def _first_prune(self) -> None:
        # A connection of its own: an SQLite connection stays in the thread that opened it. The
        # prune writes (even when it removes nothing), so it fails on a read-only database too.
        try:
            with HistoryStore(self._state_dir, busy_timeout_s=self._busy_timeout_s) as store:
                self._prune(store)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            self._log.error("history.prune_failed", path=str(self._state_dir), error=str(exc))

    async def stop(self) -> None:
        """Save what is queued, waiting at most `stop_timeout_s`; the rest is dropped and logged."""
        self._stopping.set()
        if self._thread.ident is None:
            if not self._queue.empty():
                self._log.error(
                    "history.dropped", reason="writer not started", count=self._queue.qsize()
                )
            return
        try:
            self._queue.put_nowait(None)
            sentinels = 1
        except queue.Full:  # a full queue keeps the thread busy: no wake needed
            sentinels = 0
        await asyncio.to_thread(self._thread.join, self._stop_timeout_s)
        if self._thread.is_alive():
            self._abandoned.set()
            self._log.error("history.stop_timeout", unsaved=max(0, self._queue.qsize() - sentinels))

    def _run(self) -> None:
        next_prune = time.monotonic() + self._prune_interval_s
        while not self._abandoned.is_set():
            if self._stopping.is_set() and self._queue.empty():
                break
            if time.monotonic() >= next_prune:
                self._prune_logging_failures()
                next_prune = time.monotonic() + self._prune_interval_s
            try:
                result = self._queue.get(timeout=max(0.0, next_prune - time.monotonic()))
            except queue.Empty:
                continue
            if result is not None:
                self._save(result)
        if self._store is not None:
            self._store.close()

    def _open(self) -> HistoryStore:
        if self._store is None:
            self._store = HistoryStore(self._state_dir, busy_timeout_s=self._busy_timeout_s)
        return self._store

    def _prune(self, store: HistoryStore) -> None:
        removed = store.prune(
            older_than_days=self._retention_days, now=datetime.datetime.now(datetime.UTC)
        )
        if removed:
            self._log.info("history.pruned", removed=removed)

    def _prune_logging_failures(self) -> None:
        try:
            self._prune(self._open())
        except (sqlite3.Error, OSError) as exc:
            self._log.error("history.prune_failed", path=str(self._state_dir), error=str(exc))

    def _save(self, result: Mapping[str, Any]) -> None:
        try:
            entry_id = self._open().save(result)
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._log.error(
                "history.save_failed",
                path=str(self._state_dir),
                target=_target(result),
                error=str(exc),
            )
        else:
            self._log.debug("history.saved", id=entry_id, target=_target(result))


def _target(result: Mapping[str, Any]) -> str:
    return sanitize_text(str(result.get("target")))


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
        f"Started:  {_started(entry)} UTC, took {entry.duration_s:.1f} s",
        f"Banner:   {_shown(result, 'banner')}",
        f"Verdict:  {sanitize_text(entry.verdict)} ({counts})",
        "",
        *(sanitize_text(str(line)) for line in lines),
    ]
