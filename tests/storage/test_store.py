from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import pickle
import sqlite3
import stat
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relayprobe.relaytest.events import Outcome, ProbeFinished, Summary
from relayprobe.reports.render import json_result
from relayprobe.reports.result import RESULT_ID_BYTES, TestResult, new_result_id
from relayprobe.storage.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DuplicateResultError,
    HistoryBackend,
    HistoryEntry,
    HistorySchemaError,
)
from relayprobe.storage.store import DATABASE_NAME, HistoryStore
from tests.storage.conftest import ENGINES, Database, database_of

NOW = datetime.datetime(2026, 11, 29, 18, 0, tzinfo=datetime.UTC)
DEADLINE_S = 10.0
URL_SAFE = frozenset(string.ascii_letters + string.digits + "-_")


def make_result(
    *,
    target: str = "192.0.2.4",
    started_at: datetime.datetime = NOW,
    verdict: str = "rejected",
    accepted: int = 0,
    transcript_lines: int = 3,
    result_id: str | None = None,
) -> TestResult:
    """A test of 20 probes: `accepted` of them accepted, the rest deferred."""
    probes = tuple(
        ProbeFinished(
            str(number),
            "<a@example.org>",
            "<b@example.net>",
            Outcome.ACCEPTED if number < accepted else Outcome.DEFERRED,
            "250 2.1.5 ok" if number < accepted else "450 4.7.1 try later",
        )
        for number in range(20)
    )
    summary = Summary(
        target=target,
        host="mail.example.com",
        banner="220 mail.example.com ESMTP",
        verdict=verdict,
        lines=("No relays accepted.",),
        probes=probes,
        started_at=started_at.timestamp(),
        duration_s=0.4,
    )
    transcript = tuple(f"<<< 250 line {number}" for number in range(transcript_lines))
    return TestResult(summary=summary, transcript=transcript, result_id=result_id)


def changed(result: TestResult, **changes: Any) -> TestResult:
    """`result` with fields of its summary changed."""
    return dataclasses.replace(result, summary=dataclasses.replace(result.summary, **changes))


def saved_entry(store: HistoryBackend, result: TestResult) -> HistoryEntry:
    entry = store.get(store.save(result))
    assert entry is not None
    return entry


# Both backends (the `store` and `database` fixtures of conftest.py take each in turn)


def test_round_trip_of_a_result(store: HistoryBackend) -> None:
    probe = ProbeFinished("1", "<a@example.org>", "<b@example.net>", Outcome.ACCEPTED, "250 ok")
    summary = Summary(
        target="192.0.2.4",
        host="mail.example.com",
        banner="220 hello",
        verdict="accepted",
        lines=("Accepted 1 of 1.",),
        probes=(probe,),
        started_at=NOW.timestamp(),
        duration_s=1.25,
    )
    transcript = ("Connecting to 192.0.2.4 ...", "<<< 220 hello")
    result = TestResult(summary=summary, transcript=transcript, result_id=new_result_id())

    entry_id = store.save(result)

    expected = HistoryEntry(
        entry_id, str(result.result_id), NOW, "192.0.2.4", "accepted", 1, 1.25, result.to_json()
    )
    assert store.get(entry_id) == expected
    assert store.recent(limit=10) == [expected]
    assert store.get(entry_id + 1) is None


def test_recent_is_newest_first_and_limited(store: HistoryBackend) -> None:
    ids = [store.save(make_result(accepted=number)) for number in range(5)]

    assert [entry.id for entry in store.recent(limit=3)] == ids[::-1][:3]
    assert [entry.accepted for entry in store.recent(limit=100)] == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="limit"):
        store.recent(limit=0)


def test_recent_filters_by_normalised_address(store: HistoryBackend) -> None:
    v6_first = store.save(make_result(target="2001:db8::4"))
    store.save(make_result(target="192.0.2.4"))
    v6_second = store.save(make_result(target="2001:DB8:0:0::4"))
    store.save(make_result(target="2001:db8::5"))

    found = store.recent(address="2001:DB8::4", limit=10)

    assert [entry.id for entry in found] == [v6_second, v6_first]
    assert {entry.target for entry in found} == {"2001:db8::4"}
    assert [entry.target for entry in store.recent(address="192.0.2.4", limit=10)] == ["192.0.2.4"]
    assert store.recent(address="198.51.100.1", limit=10) == []


def test_recent_refuses_what_is_not_an_address(store: HistoryBackend) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        store.recent(address="mail.example.com", limit=10)


@pytest.mark.parametrize("entry_id", [0, -1, 2**63, 10**30])
def test_get_of_a_row_number_no_row_can_have_is_none(store: HistoryBackend, entry_id: int) -> None:
    store.save(make_result())

    assert store.get(entry_id) is None


def test_results_survive_close_and_reopen(database: Database) -> None:
    with database.open() as first:
        entry_id = first.save(make_result(verdict="relayed", accepted=2))
        saved = first.get(entry_id)

    with database.open() as second:
        assert second.get(entry_id) == saved
        assert second.save(make_result()) == entry_id + 1


def test_prune_removes_what_is_older_than_the_retention(store: HistoryBackend) -> None:
    old = store.save(make_result(started_at=NOW - datetime.timedelta(days=91)))
    kept_old = store.save(make_result(started_at=NOW - datetime.timedelta(days=89, hours=23)))
    kept_new = store.save(make_result(started_at=NOW))

    assert store.prune(older_than_days=90, now=NOW) == 1
    assert store.get(old) is None
    assert [entry.id for entry in store.recent(limit=10)] == [kept_new, kept_old]
    assert store.prune(older_than_days=90, now=NOW) == 0


def test_ids_are_not_reused_after_a_prune(store: HistoryBackend) -> None:
    store.save(make_result(started_at=NOW - datetime.timedelta(days=100)))
    newest = store.save(make_result(started_at=NOW - datetime.timedelta(days=100)))
    store.prune(older_than_days=90, now=NOW)

    assert store.save(make_result()) == newest + 1


def test_prune_and_lookup_need_an_aware_time(store: HistoryBackend) -> None:
    naive = datetime.datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="time zone"):
        store.prune(older_than_days=1, now=naive)
    with pytest.raises(ValueError, match="time zone"):
        store.by_public_id(new_result_id(), now=naive, retention_days=1)


def test_a_newer_schema_is_refused(database: Database) -> None:
    database.open().close()
    database.execute(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")

    with pytest.raises(HistorySchemaError, match="newer"):
        database.open()


# Batches

# Makes the database refuse a result whose verdict is "boom", past the backend's own checks.
REFUSE_BOOM = {
    "sqlite": "CREATE TRIGGER refuse_boom BEFORE INSERT ON results WHEN NEW.verdict = 'boom'"
    " BEGIN SELECT RAISE(ABORT, 'boom refused'); END",
    "postgres": "ALTER TABLE results ADD CONSTRAINT refuse_boom CHECK (verdict <> 'boom')",
}


def test_a_batch_says_what_became_of_each_result(store: HistoryBackend) -> None:
    stored_before, twice = new_result_id(), new_result_id()
    store.save(make_result(result_id=stored_before))

    outcomes = store.save_batch(
        [
            make_result(accepted=1),
            make_result(target="mail.example.com"),
            make_result(result_id=twice, accepted=2),
            make_result(result_id=twice, accepted=3),
            make_result(result_id=stored_before, accepted=4),
            make_result(accepted=5),
        ]
    )

    first, not_an_address, once, again, stored_again, last = outcomes
    assert isinstance(first, int)
    assert isinstance(once, int)
    assert isinstance(last, int)
    assert first < once < last
    assert isinstance(not_an_address, ValueError)
    assert "does not appear to be" in str(not_an_address)
    assert isinstance(again, DuplicateResultError)
    assert isinstance(stored_again, DuplicateResultError)
    assert [entry.accepted for entry in store.recent(limit=10)] == [5, 2, 1, 0]
    assert [entry.id for entry in store.recent(limit=3)] == [last, once, first]


def test_a_batch_is_one_transaction(database: Database, store: HistoryBackend) -> None:
    database.execute(REFUSE_BOOM[database.engine])

    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.CheckViolation)):
        store.save_batch([make_result(accepted=1), make_result(verdict="boom"), make_result()])

    assert store.recent(limit=10) == []
    store.save(make_result(accepted=2))
    assert [entry.accepted for entry in store.recent(limit=10)] == [2]


def test_a_batch_of_only_refused_results_stores_nothing(store: HistoryBackend) -> None:
    outcomes = store.save_batch(
        [make_result(target="mail.example.com"), make_result(result_id="1")]
    )

    assert [type(outcome) for outcome in outcomes] == [ValueError, ValueError]
    assert store.save_batch([]) == []
    assert store.recent(limit=10) == []


# SQLite


def test_schema_version_wal_and_private_directory(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    HistoryStore(state_dir).close()

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    connection = sqlite3.connect(state_dir / DATABASE_NAME)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        index_columns = connection.execute("PRAGMA index_info(results_target_id)").fetchall()
        assert [column[2] for column in index_columns] == ["target", "id"]
        unique = {row[1]: row[2] for row in connection.execute("PRAGMA index_list(results)")}
        assert unique["results_public_id"] == 1
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (make_result(target="mail.example.com"), "does not appear to be"),
        (changed(make_result(), duration_s=float("nan")), "not JSON compliant"),
        (changed(make_result(), started_at=float("nan")), "NaN"),
        (make_result(result_id="12"), "was not made by new_result_id"),
        (make_result(result_id=new_result_id()[:-1] + "B"), "was not made by new_result_id"),
    ],
)
def test_save_refuses_a_result_it_cannot_store(
    store: HistoryBackend, result: TestResult, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.save(result)
    assert store.recent(limit=10) == []


# Public IDs


def test_save_gives_every_result_a_public_id_of_its_own(store: HistoryBackend) -> None:
    for _ in range(20):
        store.save(make_result())

    entries = store.recent(limit=100)

    assert len({entry.public_id for entry in entries}) == 20
    for entry in entries:
        assert len(entry.public_id) == 22
        assert set(entry.public_id) <= URL_SAFE
        assert entry.result["id"] == entry.public_id


def test_save_stores_the_result_id_it_is_given(store: HistoryBackend) -> None:
    result = make_result(result_id=new_result_id())

    entry = saved_entry(store, result)

    assert entry.public_id == result.result_id
    assert entry.result == result.to_json()


def test_a_public_id_is_stored_once(store: HistoryBackend) -> None:
    result = make_result(result_id=new_result_id())
    store.save(result)

    with pytest.raises(DuplicateResultError, match=f"public ID {result.result_id} is stored"):
        store.save(changed(result, target="192.0.2.5"))
    assert [entry.target for entry in store.recent(limit=10)] == ["192.0.2.4"]


def test_by_public_id_finds_the_entry_and_only_it(store: HistoryBackend) -> None:
    entries = [saved_entry(store, make_result(accepted=number)) for number in range(3)]

    for entry in entries:
        assert store.by_public_id(entry.public_id, now=NOW, retention_days=90) == entry
    assert store.by_public_id(new_result_id(), now=NOW, retention_days=90) is None


@pytest.mark.parametrize(
    ("age", "expired"),
    [
        (datetime.timedelta(days=89, hours=23), False),
        (datetime.timedelta(days=90), False),
        (datetime.timedelta(days=90, microseconds=1), True),
        (datetime.timedelta(days=400), True),
    ],
)
def test_an_expired_result_is_not_found_even_before_the_prune(
    store: HistoryBackend, age: datetime.timedelta, expired: bool
) -> None:
    entry = saved_entry(store, make_result(started_at=NOW - age))

    found = store.by_public_id(entry.public_id, now=NOW, retention_days=90)

    assert found == (None if expired else entry)
    assert store.get(entry.id) == entry
    # The prune removes just what the lookup no longer finds.
    assert store.prune(older_than_days=90, now=NOW) == int(expired)


@pytest.fixture(scope="module", params=ENGINES)
def closed_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> HistoryBackend:
    """A store whose connection is closed: any SQL it runs raises an error that says so."""
    if request.param == "sqlite":
        where = str(tmp_path_factory.mktemp("closed"))
    else:
        where = request.getfixturevalue("postgres").url
    closed = database_of(request.param, where).open()
    closed.close()
    return closed


def made_by_new_result_id(text: str) -> bool:
    """Whether `text` is 16 bytes in unpadded URL-safe base64, in the one way it encodes them."""
    if len(text) != 22 or not set(text) <= URL_SAFE:
        return False
    decoded = base64.urlsafe_b64decode(text + "==")
    return len(decoded) == RESULT_ID_BYTES and base64.urlsafe_b64encode(decoded) == (
        text.encode() + b"=="
    )


def url_safe_base64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@given(
    st.one_of(
        st.text(),
        st.text(alphabet=sorted(URL_SAFE), min_size=20, max_size=24),
        st.binary(min_size=RESULT_ID_BYTES, max_size=RESULT_ID_BYTES).map(url_safe_base64),
        st.binary(max_size=32).map(url_safe_base64),
    )
)
@example(new_result_id())
@example("")
@example("1" * 22)  # all digits: a row number, never a public ID
@example(new_result_id()[:-1] + "B")  # the last character holds 2 bits: A, Q, g or w
@example(new_result_id() + "\n")
@example(new_result_id() + "A")
@example(new_result_id()[1:])
@example("+/+/+/+/+/+/+/+/+/+/+A")  # standard base64, not URL-safe
@example("AAAAAAAAAAAAAAAAAAAAAA==")
@example("' OR 1=1 --           A")
@example("\uff41" * 21 + "A")  # fullwidth letters: alphanumeric, but not ASCII
def test_only_well_formed_public_ids_reach_sql(closed_store: HistoryBackend, text: str) -> None:
    if made_by_new_result_id(text):
        with pytest.raises((sqlite3.ProgrammingError, psycopg.OperationalError), match="closed"):
            closed_store.by_public_id(text, now=NOW, retention_days=90)
    else:
        assert closed_store.by_public_id(text, now=NOW, retention_days=90) is None


# Migrations


def version_1_database(state_dir: Path, documents: list[str]) -> None:
    """A history made by relayprobe before public IDs, holding a row for each of `documents`."""
    state_dir.mkdir(exist_ok=True)
    connection = sqlite3.connect(state_dir / DATABASE_NAME, isolation_level=None)
    try:
        # Version 1 is the first migration step, which never changes once shipped.
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version (version) VALUES (1)")
        MIGRATIONS[0].sqlite(connection)
        connection.executemany(
            "INSERT INTO results (started_at, target, verdict, accepted, relayed, deferred,"
            " rejected, errors, duration_s, result)"
            " VALUES ('2026-11-29T18:00:00.000000+00:00', '192.0.2.4', 'rejected', 0, 0, 20,"
            " 0, 0, 0.4, ?)",
            [(document,) for document in documents],
        )
    finally:
        connection.close()


def version_1_document(result: TestResult) -> str:
    # What version 1 stored: the JSON result, without an id.
    return json.dumps(json_result(result.summary, result.transcript))


def test_a_version_1_database_gets_a_public_id_for_each_result(tmp_path: Path) -> None:
    documents = [version_1_document(make_result(accepted=number)) for number in range(3)]
    version_1_database(tmp_path, documents)

    with HistoryStore(tmp_path) as store:
        entries = store.recent(limit=10)
        found = [
            store.by_public_id(entry.public_id, now=NOW, retention_days=90) for entry in entries
        ]
        next_id = store.save(make_result())

    assert [entry.id for entry in entries] == [3, 2, 1]
    assert found == entries
    assert len({entry.public_id for entry in entries}) == 3
    for entry, document in zip(entries, reversed(documents), strict=True):
        assert made_by_new_result_id(entry.public_id)
        assert entry.result == {**json.loads(document), "id": entry.public_id}
    assert next_id == 4


def test_a_version_1_row_that_is_not_json_is_migrated_as_it_is(tmp_path: Path) -> None:
    version_1_database(tmp_path, ["not JSON", version_1_document(make_result())])

    HistoryStore(tmp_path).close()

    connection = sqlite3.connect(tmp_path / DATABASE_NAME)
    try:
        rows = connection.execute("SELECT public_id, result FROM results ORDER BY id").fetchall()
        version = connection.execute("SELECT version FROM schema_version").fetchone()
    finally:
        connection.close()
    assert version == (SCHEMA_VERSION,)
    assert [made_by_new_result_id(public_id) for public_id, _ in rows] == [True, True]
    assert rows[0][1] == "not JSON"
    assert json.loads(rows[1][1])["id"] == rows[1][0]


# Durability

LOOPING_WRITER = """
import pickle, sys, time
from relayprobe.storage.store import HistoryStore

store = HistoryStore(sys.argv[1])
result = pickle.loads(bytes.fromhex(sys.argv[2]))
deadline = time.monotonic() + 10
for count in range(50_000):
    if time.monotonic() > deadline:
        break
    store.save(result)
    if count == 10:
        print("writing", flush=True)
"""


def test_sigkill_while_writing_leaves_a_readable_database(tmp_path: Path) -> None:
    # Without a result_id, each save gets a public ID of its own.
    result = make_result(transcript_lines=40)
    at_least = 0
    for kill_after_s in (0.0, 0.02, 0.1):
        writer = subprocess.Popen(
            [sys.executable, "-c", LOOPING_WRITER, str(tmp_path), pickle.dumps(result).hex()],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == "writing\n"
            time.sleep(kill_after_s)
        finally:
            writer.kill()
            writer.wait(timeout=DEADLINE_S)
        assert writer.returncode == -9

        # The 11 saves before "writing" were committed before the kill.
        at_least += 11
        with HistoryStore(tmp_path) as store:
            entries = store.recent(limit=at_least)
            assert len(entries) == at_least
            assert entries[0].result == {**result.to_json(), "id": entries[0].public_id}
        connection = sqlite3.connect(tmp_path / DATABASE_NAME)
        try:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            at_least = connection.execute("SELECT count(*) FROM results").fetchone()[0]
        finally:
            connection.close()
