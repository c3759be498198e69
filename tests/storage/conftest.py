from __future__ import annotations

import functools
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from relayprobe.storage.pgstore import PostgresHistory
from relayprobe.storage.schema import HistoryBackend
from relayprobe.storage.store import DATABASE_NAME, HistoryStore
from tests.infra.dataservers import PostgresServer

ENGINES = ("sqlite", "postgres")


@pytest.fixture
def database_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database; dropped after the test."""
    name = f"history_{secrets.token_hex(6)}"
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"{postgres.url.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass(frozen=True)
class Database:
    """A history database under test, on one engine, and a side door to it."""

    engine: str
    open: Callable[[], HistoryBackend]
    where: str
    """The SQLite state directory or the PostgreSQL URL."""

    def execute(self, statement: str) -> list[tuple[Any, ...]]:
        """Run `statement` on a connection of its own, committed; the rows it returns."""
        if self.engine == "sqlite":
            connection = sqlite3.connect(Path(self.where, DATABASE_NAME), isolation_level=None)
            try:
                return connection.execute(statement).fetchall()
            finally:
                connection.close()
        with psycopg.connect(self.where, autocommit=True) as connection:
            cursor = connection.execute(statement.encode())
            return cursor.fetchall() if cursor.description is not None else []


def database_of(engine: str, where: str) -> Database:
    if engine == "sqlite":
        return Database(engine, functools.partial(HistoryStore, where), where)
    return Database(engine, functools.partial(PostgresHistory, where), where)


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty history on each engine in turn."""
    if request.param == "sqlite":
        return database_of("sqlite", str(tmp_path / "state"))
    return database_of("postgres", request.getfixturevalue("database_url"))


@pytest.fixture
def store(database: Database) -> Iterator[HistoryBackend]:
    with database.open() as opened:
        yield opened
