"""PostgresHistory against a real PostgreSQL. What both backends do alike is in test_store.py,
run on each; here, what only PostgreSQL has: its schema, migrations that replicas run at once,
and the bounds of every call."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest

from relayprobe.storage.history import is_unavailable
from relayprobe.storage.pgstore import MIGRATION_LOCK, PostgresHistory
from relayprobe.storage.schema import MIGRATIONS, SCHEMA_VERSION
from tests.storage.test_store import DEADLINE_S, NOW, made_by_new_result_id, make_result


def rows(url: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(statement.encode()).fetchall()


def test_schema_columns_indexes_and_version(database_url: str) -> None:
    PostgresHistory(database_url).close()

    columns = dict(
        rows(
            database_url,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'results'",
        )
    )
    assert columns == {
        "id": "bigint",
        "public_id": "text",
        "started_at": "timestamp with time zone",
        "target": "text",
        "verdict": "text",
        "accepted": "integer",
        "relayed": "integer",
        "deferred": "integer",
        "rejected": "integer",
        "errors": "integer",
        "duration_s": "double precision",
        "result": "jsonb",
    }
    indexes = dict(rows(database_url, "SELECT indexname, indexdef FROM pg_indexes"))
    assert indexes["results_target_id"].endswith("(target, id)")
    assert indexes["results_started_at"].endswith("(started_at)")
    assert indexes["results_public_id"].startswith("CREATE UNIQUE INDEX")
    assert rows(database_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert rows(
        database_url,
        "SELECT is_nullable, is_identity FROM information_schema.columns"
        " WHERE table_name = 'results' AND column_name IN ('public_id', 'id') ORDER BY column_name",
    ) == [("NO", "YES"), ("NO", "NO")]


def test_results_are_jsonb_and_times_utc(database_url: str) -> None:
    with PostgresHistory(database_url) as store:
        entry = store.get(store.save(make_result()))

    assert entry is not None
    assert entry.started_at == NOW
    assert entry.started_at.utcoffset() is not None
    assert entry.started_at.utcoffset() == NOW.utcoffset()
    [(kind, verdict)] = rows(
        database_url, "SELECT jsonb_typeof(result), result->>'verdict' FROM results"
    )
    assert (kind, verdict) == ("object", "rejected")


# Migrations


def waiting_for_the_migration_lock(url: str) -> int:
    return int(
        rows(
            url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            f" AND ((classid::bigint << 32) | objid::bigint) = {MIGRATION_LOCK}",
        )[0][0]
    )


def test_two_replicas_starting_together_migrate_in_turn(database_url: str) -> None:
    # Holding the lock here makes both openers find no schema and then wait for it together:
    # without the lock, both would create the tables and one would fail.
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            openers = [pool.submit(PostgresHistory, database_url) for _ in range(2)]
            deadline = time.monotonic() + DEADLINE_S
            while waiting_for_the_migration_lock(database_url) < 2:
                assert not any(opener.done() for opener in openers), "an opener did not wait"
                assert time.monotonic() < deadline, "the openers never waited for the lock"
                time.sleep(0.01)
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            stores = [opener.result(timeout=DEADLINE_S) for opener in openers]

    try:
        ids = [store.save(make_result()) for store in stores]
    finally:
        for store in stores:
            store.close()
    assert rows(database_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert sorted(ids) == [1, 2]


def version_1_database(url: str, documents: list[str]) -> None:
    """A history made before public IDs (none ever shipped on PostgreSQL; the step must work)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version (version) VALUES (1)")
        MIGRATIONS[0].postgres(connection)
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO results (started_at, target, verdict, accepted, relayed, deferred,"
                " rejected, errors, duration_s, result)"
                " VALUES (now(), '192.0.2.4', 'rejected', 0, 0, 20, 0, 0, 0.4, %s::jsonb)",
                [(document,) for document in documents],
            )


def test_a_version_1_database_gets_a_public_id_for_each_result(database_url: str) -> None:
    documents = [json.dumps({"verdict": "rejected", "accepted": n}) for n in range(3)]
    version_1_database(database_url, [*documents, '["not an object"]'])

    with PostgresHistory(database_url) as store:
        entries = store.recent(limit=10)
        next_id = store.save(make_result())

    assert [entry.id for entry in entries] == [4, 3, 2, 1]
    assert all(made_by_new_result_id(entry.public_id) for entry in entries)
    assert len({entry.public_id for entry in entries}) == 4
    assert entries[0].result == ["not an object"]
    for entry, document in zip(entries[1:], reversed(documents), strict=True):
        assert entry.result == {**json.loads(document), "id": entry.public_id}
    assert next_id == 5
    assert rows(database_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


# Bounds


@pytest.fixture
def slow_inserts(database_url: str) -> Iterator[None]:
    """Every insert into the history takes 30 s."""
    PostgresHistory(database_url).close()
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$"
        )
        connection.execute(
            "CREATE TRIGGER slow BEFORE INSERT ON results FOR EACH ROW EXECUTE FUNCTION slow()"
        )
    yield


@pytest.mark.usefixtures("slow_inserts")
def test_a_slow_statement_ends_at_the_statement_timeout(database_url: str) -> None:
    with PostgresHistory(database_url, statement_timeout_s=0.2) as store:
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout") as raised:
            store.save(make_result())
        assert is_unavailable(raised.value)
        # The failed transaction is over: the session goes on.
        assert store.recent(limit=1) == []


def test_a_held_lock_ends_at_the_lock_timeout(database_url: str) -> None:
    PostgresHistory(database_url).close()
    with psycopg.connect(database_url) as locker:
        locker.execute("LOCK TABLE results IN ACCESS EXCLUSIVE MODE")
        with PostgresHistory(database_url, lock_timeout_s=0.2) as store:
            with pytest.raises(psycopg.errors.LockNotAvailable, match="lock timeout") as raised:
                store.recent(limit=1)
            assert is_unavailable(raised.value)
        locker.rollback()


def test_a_server_that_never_answers_ends_at_the_connect_timeout() -> None:
    # A listener that accepts nothing: the kernel completes the handshake, no server speaks.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            opening = pool.submit(
                PostgresHistory, f"postgresql://x@127.0.0.1:{port}/x", connect_timeout_s=2
            )
            with pytest.raises(psycopg.OperationalError, match="timeout") as raised:
                opening.result(timeout=DEADLINE_S)
    assert is_unavailable(raised.value)


def test_a_server_that_is_down_fails_at_once() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(psycopg.OperationalError, match="refused") as raised:
            PostgresHistory(f"postgresql://x@127.0.0.1:{port}/x")
    assert is_unavailable(raised.value)
