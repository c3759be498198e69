"""open_history and what reads through it: the web door's StoredResults, on either backend."""

from __future__ import annotations

import datetime
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from relayprobe.cli import main
from relayprobe.frontdoors.web import MAX_LOOKUPS, StoredResults
from relayprobe.reports.result import new_result_id
from relayprobe.storage.history import (
    HistoryUnavailableError,
    error_line,
    history_location,
    is_unavailable,
    open_history,
)
from relayprobe.storage.historywriter import HistoryWriter
from relayprobe.storage.pgstore import PostgresHistory
from relayprobe.storage.schema import HistoryBackend
from relayprobe.storage.store import HistoryStore
from tests.storage.conftest import Database, database_of
from tests.storage.test_store import DEADLINE_S, make_result


def test_open_history_is_sqlite_unless_a_database_url_is_given(
    tmp_path: Path, database_url: str
) -> None:
    with open_history(state_dir=tmp_path, database_url=None) as store:
        assert isinstance(store, HistoryStore)
    with open_history(state_dir=tmp_path / "unused", database_url=database_url) as store:
        assert isinstance(store, PostgresHistory)
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    ("database_url", "location"),
    [
        (None, "/var/lib/relayprobe"),
        (
            "postgresql://relayprobe:s3cret@db.example:5433/history",
            "PostgreSQL database history on db.example:5433",
        ),
        (
            "postgresql://db.example/history?password=s3cret",
            "PostgreSQL database history on db.example:5432",
        ),
        ("postgresql://db.example/\x1b[2J", "PostgreSQL database \\x1b[2J on db.example:5432"),
        (
            "postgresql://db.example/history?nosuch=1",
            "the PostgreSQL database of --database-url (not a valid URL)",
        ),
    ],
)
def test_history_location_never_shows_the_password(database_url: str | None, location: str) -> None:
    assert history_location(state_dir="/var/lib/relayprobe", database_url=database_url) == location


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (psycopg.OperationalError("connection refused"), True),
        (
            psycopg.OperationalError(
                'connection to server at "db", port 5432 failed: FATAL:  password '
                'authentication failed for user "relayprobe"'
            ),
            False,
        ),
        (psycopg.OperationalError('FATAL:  database "history" does not exist'), False),
        (psycopg.OperationalError("FATAL:  the database system is starting up"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), True),
        (psycopg.errors.CheckViolation("refused"), False),
        (psycopg.ProgrammingError("invalid dsn"), False),
        (ValueError("not an address"), False),
    ],
)
def test_only_errors_that_may_pass_are_unavailable(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


def test_a_missing_table_is_no_passing_trouble() -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table") as raised:
        sqlite3.connect(":memory:").execute("SELECT * FROM results")
    assert not is_unavailable(raised.value)


def test_a_locked_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / "history.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as raised:
            HistoryStore(tmp_path, busy_timeout_s=0.01).save(make_result())
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert is_unavailable(raised.value)


def test_an_error_is_one_harmless_line() -> None:
    error = psycopg.OperationalError("connection failed:\n\tIs the server\x1b[2J running?\n")
    assert error_line(error) == "connection failed: Is the server\\x1b[2J running?"


# StoredResults


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def results_of(database: Database, **options: Any) -> StoredResults:
    writer = HistoryWriter(database.open)
    return StoredResults(database.open, retention_days=90, writer=writer, **options)


async def test_stored_results_are_found_by_public_id_within_the_retention(
    database: Database,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    recent = make_result(result_id=new_result_id(), started_at=now)
    expired = make_result(result_id=new_result_id(), started_at=now - datetime.timedelta(days=91))
    with database.open() as store:
        store.save(recent)
        store.save(expired)
    results = results_of(database)

    assert recent.result_id is not None
    assert expired.result_id is not None
    assert await results.find(recent.result_id) == recent.to_json()
    assert await results.find(expired.result_id) is None
    assert await results.find(new_result_id()) is None


async def test_a_result_not_yet_saved_is_found_in_the_writer(database: Database) -> None:
    results = results_of(database)
    result = make_result(result_id=new_result_id())
    assert result.result_id is not None
    results.writer.submit(result)

    assert await results.find(result.result_id) == result.to_json()
    await results.writer.stop()


async def test_an_unreachable_database_makes_a_lookup_unavailable(
    logs: list[MutableMapping[str, Any]],
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = database_of("postgres", f"postgresql://x@127.0.0.1:{closed.getsockname()[1]}/x")
        with pytest.raises(HistoryUnavailableError, match="refused"):
            await results_of(down).find(new_result_id())
    [failed] = [entry for entry in logs if entry["event"] == "history.lookup_failed"]
    assert "refused" in failed["error"]


async def test_a_hung_lookup_gives_up_but_keeps_its_slot_until_its_thread_ends(
    tmp_path: Path,
) -> None:
    database = database_of("sqlite", str(tmp_path))
    release = threading.Event()
    opened: list[int] = []

    def hanging_open() -> HistoryBackend:
        opened.append(1)
        release.wait()
        return database.open()

    writer = HistoryWriter(database.open)
    results = StoredResults(hanging_open, retention_days=90, writer=writer, timeout_s=0.05)
    for _ in range(MAX_LOOKUPS + 2):
        with pytest.raises(HistoryUnavailableError, match=r"no answer in 0\.05 s"):
            await results.find(new_result_id())
    # The lookups past MAX_LOOKUPS found no free slot: no thread of theirs waits.
    assert len(opened) == MAX_LOOKUPS

    release.set()
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            assert await results.find(new_result_id()) is None
            break
        except HistoryUnavailableError:
            assert time.monotonic() < deadline, "the slots were never given back"


# `relayprobe history`


def history_options(database: Database, tmp_path: Path) -> list[str]:
    if database.engine == "sqlite":
        return ["--state-dir", database.where]
    # The state directory holds no history: only the database is read.
    return ["--database-url", database.where, "--state-dir", str(tmp_path / "empty")]


def test_relayprobe_history_lists_and_shows_from_either_backend(
    database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with database.open() as store:
        store.save(make_result(target="192.0.2.4"))
        shown = store.get(store.save(make_result(target="2001:db8::5", accepted=2)))
    assert shown is not None
    options = history_options(database, tmp_path)

    assert main(["history", *options]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [row.split()[3] for row in listing[1:]] == ["2001:db8::5", "192.0.2.4"]
    assert main(["history", "--show", shown.public_id, *options]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"Test #{shown.id} of 2001:db8::5 (mail.example.com)",
        f"Public ID: {shown.public_id}",
    ]
    assert main(["history", "--json", "192.0.2.4", *options]) == 0
    assert [result["target"] for result in json.loads(capsys.readouterr().out)] == ["192.0.2.4"]


def test_relayprobe_history_of_an_unreachable_database_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql://relayprobe:s3cret@127.0.0.1:{port}/history"
        status = main(["history", "--database-url", url, "--state-dir", str(tmp_path)])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(
        f"relayprobe history: cannot read the history in PostgreSQL database history on"
        f" 127.0.0.1:{port}: connection failed: "
    )
    assert "refused" in line
    assert "s3cret" not in line
