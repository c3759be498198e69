"""The result history where the settings put it: PostgreSQL at `--database-url`, shared by every
replica, or SQLite under `--state-dir` (the default, for one process). What callers need to tell
its failures apart is here too.

psycopg is loaded only for PostgreSQL: `relayprobe history` on SQLite, and a single process,
never pay for it (nor for its memory). Until it is loaded, none of its errors can be raised.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from relayprobe.relaytest.sanitize import sanitize_text
from relayprobe.storage.schema import HistoryBackend, HistorySchemaError
from relayprobe.storage.store import HistoryStore

_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OSError, HistorySchemaError)


def history_errors() -> tuple[type[Exception], ...]:
    """What opening or using a history raises when the database fails (besides the ValueError
    of a result that cannot be stored), for an `except` clause; a newer schema is one of them."""
    psycopg = sys.modules.get("psycopg")
    return _ERRORS if psycopg is None else (*_ERRORS, psycopg.Error)


class HistoryUnavailableError(OSError):
    """The history cannot be read now (database unreachable, busy or slow); later it may."""


def open_history(*, state_dir: Path | str, database_url: str | None) -> HistoryBackend:
    """The history in PostgreSQL at `database_url` if given, else in SQLite under `state_dir`;
    created or migrated as it opens. Raises one of `history_errors()` if it cannot be opened."""
    if database_url is not None:
        from relayprobe.storage.pgstore import PostgresHistory

        return PostgresHistory(database_url)
    return HistoryStore(state_dir)


def history_location(*, state_dir: Path | str, database_url: str | None) -> str:
    """Where the history is, for a message: never the URL's password."""
    if database_url is None:
        return str(state_dir)
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error:
        return "the PostgreSQL database of --database-url (not a valid URL)"
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
    return sanitize_text(f"PostgreSQL database {params.get('dbname') or '?'} on {where}")


# What PostgreSQL says when it was reached and refuses this client for good: a wrong password,
# user or database name. libpq gives a connection failure no SQLSTATE, only its message (in
# the server's language: an unknown wording counts as an outage, which is only less direct).
_REFUSED_CONNECTION = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be used now but may be soon: unreachable, shut
    down, over a timeout, locked. Worth a retry, unlike a refused statement or a bad schema,
    or a server that refuses these credentials."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        return not any(phrase in str(exc) for phrase in _REFUSED_CONNECTION)
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def error_line(exc: BaseException) -> str:
    """A database error as one harmless line: libpq's messages span lines, and a server's
    text is not to be trusted with a terminal."""
    return sanitize_text(" ".join(str(exc).split()))
