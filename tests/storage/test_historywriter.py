from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relayprobe.reports.result import TestResult, new_result_id
from relayprobe.storage.historywriter import HistoryWriter
from relayprobe.storage.schema import HistoryEntry
from relayprobe.storage.store import DATABASE_NAME, HistoryStore
from tests.infra.dataservers import PostgresServer
from tests.storage.conftest import Database, database_of
from tests.storage.test_store import DEADLINE_S, NOW, make_result

NOBODY = 65534
# Retries come at once in tests: what they show does not depend on the interval.
RETRY_S = 0.02


def wait_until(condition: Callable[[], bool], *, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


async def eventually(condition: Callable[[], bool]) -> None:
    await asyncio.to_thread(wait_until, condition)


@pytest.fixture(autouse=True)
def no_writer_thread_left() -> Iterator[None]:
    """An abandoned writer thread ends soon after its test, before it can log into the next."""
    yield
    wait_until(lambda: all(t.name != "relayprobe-history" for t in threading.enumerate()))


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def stored(database: Database) -> list[HistoryEntry]:
    with database.open() as store:
        return store.recent(limit=1000)


def sqlite(state_dir: Path) -> Database:
    return database_of("sqlite", str(state_dir))


@dataclasses.dataclass
class Drops:
    """An `on_dropped` hook that keeps its counts."""

    counts: list[int] = dataclasses.field(default_factory=list)

    def __call__(self, count: int) -> None:
        self.counts.append(count)


# Either backend (the `database` fixture of conftest.py takes each in turn)


async def test_writer_saves_what_is_submitted(
    database: Database, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(database.open)
    await writer.start()
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.stop()

    assert [entry.accepted for entry in stored(database)] == [2, 1, 0]
    assert [entry["log_level"] for entry in logs] == ["debug"] * 3


async def test_writer_stores_the_result_id_as_the_public_id(database: Database) -> None:
    result = make_result(result_id=new_result_id())
    writer = HistoryWriter(database.open)
    await writer.start()
    writer.submit(result)
    await writer.stop()

    assert [entry.public_id for entry in stored(database)] == [result.result_id]


async def test_writer_drops_counts_and_logs_when_the_queue_is_full(
    database: Database, logs: list[MutableMapping[str, Any]]
) -> None:
    drops = Drops()
    writer = HistoryWriter(database.open, queue_size=2, on_dropped=drops)
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.start()
    await writer.stop()

    assert [entry.accepted for entry in stored(database)] == [1, 0]
    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "warning",
            "reason": "queue full",
            "target": "192.0.2.4",
        }
    ]
    assert drops.counts == [1]


async def test_writer_drops_counts_and_logs_after_stop(
    database: Database, logs: list[MutableMapping[str, Any]]
) -> None:
    drops = Drops()
    writer = HistoryWriter(database.open, on_dropped=drops)
    await writer.start()
    await writer.stop()
    writer.submit(make_result())

    assert stored(database) == []
    assert [entry["reason"] for entry in events(logs, "history.dropped")] == ["writer stopped"]
    assert drops.counts == [1]


async def test_stop_without_start_logs_and_counts_what_is_dropped(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    drops = Drops()
    writer = HistoryWriter(sqlite(tmp_path / "state").open, on_dropped=drops)
    writer.submit(make_result())
    writer.submit(make_result())
    await writer.stop()

    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "error",
            "reason": "writer not started",
            "count": 2,
        }
    ]
    assert drops.counts == [2]
    assert not (tmp_path / "state").exists()


async def test_writer_logs_and_counts_a_result_it_cannot_store_and_goes_on(
    database: Database, logs: list[MutableMapping[str, Any]]
) -> None:
    drops = Drops()
    twice = make_result(result_id=new_result_id())
    writer = HistoryWriter(database.open, on_dropped=drops)
    await writer.start()
    writer.submit(make_result(target="not an address\x1b[2J"))
    writer.submit(twice)
    writer.submit(twice)
    writer.submit(make_result())
    await writer.stop()

    assert len(stored(database)) == 2
    not_an_address, stored_twice = events(logs, "history.save_failed")
    assert not_an_address["target"] == "not an address\\x1b[2J"
    assert "does not appear to be" in not_an_address["error"]
    assert stored_twice["error"] == f"a result with public ID {twice.result_id} is stored"
    assert sum(drops.counts) == 2


async def test_writer_prunes_at_start_and_then_periodically(
    database: Database, logs: list[MutableMapping[str, Any]]
) -> None:
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    with database.open() as store:
        store.save(make_result(started_at=long_ago))
    writer = HistoryWriter(database.open, retention_days=30, prune_interval_s=0.05)
    await writer.start()
    try:
        await eventually(lambda: len(events(logs, "history.pruned")) == 1)
        writer.submit(make_result(started_at=long_ago))
        writer.submit(make_result())
        await eventually(lambda: len(events(logs, "history.pruned")) == 2)
    finally:
        await writer.stop()

    assert [entry.started_at for entry in stored(database)] == [NOW]


async def test_a_result_is_found_by_its_id_before_and_after_it_is_saved(
    database: Database,
) -> None:
    writer = HistoryWriter(database.open)
    result = make_result(result_id=new_result_id())
    assert result.result_id is not None
    # Not started: the queue holds the result and no thread saves it yet.
    writer.submit(result)
    assert writer.unsaved(result.result_id) is result
    await writer.start()
    await eventually(lambda: writer.unsaved(result.result_id) is None)
    await writer.stop()
    (entry,) = stored(database)
    assert entry.public_id == result.result_id


class BatchCounter:
    """Opens the history as `database` does, and keeps the size of every batch saved."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.sizes: list[int] = []

    def open(self) -> Any:
        backend = self.database.open()
        save_batch = backend.save_batch

        def counted(results: Sequence[TestResult]) -> list[int | ValueError]:
            self.sizes.append(len(results))
            return save_batch(results)

        backend.save_batch = counted  # type: ignore[method-assign]
        return backend


async def test_writer_saves_in_batches_of_at_most_batch_size(database: Database) -> None:
    counter = BatchCounter(database)
    writer = HistoryWriter(counter.open, queue_size=200, batch_size=64)
    for accepted in range(150):
        writer.submit(make_result(accepted=accepted % 20))
    await writer.start()
    await writer.stop()

    assert counter.sizes == [64, 64, 22]
    assert len(stored(database)) == 150


@pytest.fixture
async def loop_lag() -> AsyncIterator[list[float]]:
    """The worst lateness of a 1 ms ticker on the event loop while the test runs."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst[0] = max(worst[0], time.perf_counter() - before - 0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    yield worst
    ticker.cancel()


async def test_a_locked_database_holds_results_until_it_is_free_without_blocking_the_loop(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], loop_lag: list[float]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    drops = Drops()
    open_store = functools.partial(HistoryStore, tmp_path, busy_timeout_s=0.2)
    writer = HistoryWriter(open_store, retry_interval_s=RETRY_S, on_dropped=drops)
    await writer.start()
    try:
        started = time.perf_counter()
        for accepted in range(3):
            writer.submit(make_result(accepted=accepted))
        submitting_s = time.perf_counter() - started
        await eventually(lambda: len(events(logs, "history.unavailable")) == 1)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    writer.submit(make_result(accepted=7))
    await writer.stop()

    assert submitting_s < 0.01
    assert loop_lag[0] < 0.05
    assert [entry.accepted for entry in stored(sqlite(tmp_path))] == [7, 2, 1, 0]
    [unavailable] = events(logs, "history.unavailable")
    assert unavailable["error"] == "database is locked"
    assert unavailable["log_level"] == "error"
    assert len(events(logs, "history.recovered")) == 1
    assert events(logs, "history.save_failed") == []
    assert drops.counts == []
    assert events(logs, "history.prune_failed")[0]["error"] == "database is locked"


async def test_stop_gives_up_after_its_timeout_and_counts_what_it_leaves(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    drops = Drops()
    writer = HistoryWriter(
        functools.partial(HistoryStore, tmp_path, busy_timeout_s=0.2),
        retry_interval_s=RETRY_S,
        stop_timeout_s=0.3,
        on_dropped=drops,
    )
    try:
        for _ in range(20):
            writer.submit(make_result())
        await writer.start()
        started = time.perf_counter()
        await writer.stop()
        stopping_s = time.perf_counter() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert stopping_s < 1.0
    assert events(logs, "history.stop_timeout") == [
        {"event": "history.stop_timeout", "log_level": "error", "unsaved": 20}
    ]
    assert drops.counts == [20]


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Root writes anywhere: as root, act as `nobody` for a while (all threads, by glibc)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    # Not under tmp_path: its parents are private to root, and `nobody` must reach this one.
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o700)


@pytest.mark.parametrize(
    ("subdirectory", "error"),
    [("", "unable to open database file"), ("state", "Permission denied")],
)
async def test_read_only_state_dir_fails_the_start(
    read_only_dir: Path, subdirectory: str, error: str
) -> None:
    writer = HistoryWriter(sqlite(read_only_dir / subdirectory).open)
    # Imports the executor's module now: `nobody` may not read the interpreter's files.
    await asyncio.to_thread(int)
    with unprivileged(), pytest.raises((sqlite3.Error, OSError), match=error):
        await writer.start()

    assert list(read_only_dir.iterdir()) == []


async def test_read_only_database_fails_the_start(read_only_dir: Path) -> None:
    # Where the directory may be written but the database may not (restored from a backup as
    # root, say), SQLite opens it read-only without a word: only a write tells.
    read_only_dir.chmod(0o777)
    HistoryStore(read_only_dir).close()
    (read_only_dir / DATABASE_NAME).chmod(0o444)
    writer = HistoryWriter(sqlite(read_only_dir).open)
    await asyncio.to_thread(int)
    with unprivileged(), pytest.raises(sqlite3.OperationalError, match="readonly database"):
        await writer.start()


async def test_state_dir_under_a_file_fails_the_start_even_for_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    writer = HistoryWriter(sqlite(tmp_path / "file" / "state").open)
    with pytest.raises(NotADirectoryError):
        await writer.start()


# PostgreSQL: refused results, an outage, a start while it is down


async def test_a_result_postgres_refuses_does_not_cost_its_batch(
    database_url: str, logs: list[MutableMapping[str, Any]]
) -> None:
    # JSONB holds no U+0000 (SQLite's text does): the database, not the backend, refuses it.
    database = database_of("postgres", database_url)
    drops = Drops()
    writer = HistoryWriter(database.open, on_dropped=drops)
    refused = dataclasses.replace(make_result(accepted=1), transcript=("a\x00b",))
    for result in (make_result(accepted=0), refused, make_result(accepted=2)):
        writer.submit(result)
    await writer.start()
    await writer.stop()

    assert [entry.accepted for entry in stored(database)] == [2, 0]
    [failed] = events(logs, "history.save_failed")
    assert "\\u0000 cannot be converted to text" in failed["error"]
    assert drops.counts == [1]


async def test_results_wait_out_a_postgres_outage_and_are_saved_after_it(
    own_postgres: PostgresServer,
    logs: list[MutableMapping[str, Any]],
    loop_lag: list[float],
) -> None:
    database = database_of("postgres", own_postgres.url)
    drops = Drops()
    writer = HistoryWriter(database.open, retry_interval_s=RETRY_S, on_dropped=drops)
    await writer.start()
    try:
        writer.submit(make_result(accepted=1))
        await eventually(lambda: len(events(logs, "history.saved")) == 1)
        await asyncio.to_thread(own_postgres.stop)
        during = make_result(accepted=2, result_id=new_result_id())
        started = time.perf_counter()
        writer.submit(during)
        writer.submit(make_result(accepted=3))
        submitting_s = time.perf_counter() - started
        await eventually(lambda: len(events(logs, "history.unavailable")) == 1)
        assert during.result_id is not None
        assert writer.unsaved(during.result_id) is during
        await asyncio.to_thread(own_postgres.start)
        await eventually(lambda: len(events(logs, "history.recovered")) == 1)
        writer.submit(make_result(accepted=4))
    finally:
        await writer.stop()
    # Before `stored`, which reads on the loop.
    worst_lag_s = loop_lag[0]

    assert [entry.accepted for entry in stored(database)] == [4, 3, 2, 1]
    assert writer.unsaved(during.result_id) is None
    assert drops.counts == []
    assert events(logs, "history.save_failed") == []
    assert submitting_s < 0.01
    assert worst_lag_s < 0.05


async def test_an_outage_loses_only_what_overflows_the_queue_and_counts_it(
    own_postgres: PostgresServer, logs: list[MutableMapping[str, Any]]
) -> None:
    database = database_of("postgres", own_postgres.url)
    drops = Drops()
    writer = HistoryWriter(database.open, queue_size=3, retry_interval_s=RETRY_S, on_dropped=drops)
    await writer.start()
    try:
        await asyncio.to_thread(own_postgres.stop)
        for accepted in range(5):
            writer.submit(make_result(accepted=accepted))
        assert drops.counts == [1, 1]
        await asyncio.to_thread(own_postgres.start)
    finally:
        await writer.stop()

    assert [entry.accepted for entry in stored(database)] == [2, 1, 0]
    assert [entry["reason"] for entry in events(logs, "history.dropped")] == ["queue full"] * 2


async def test_a_writer_started_while_postgres_is_down_saves_once_it_is_up(
    own_postgres: PostgresServer, logs: list[MutableMapping[str, Any]]
) -> None:
    database = database_of("postgres", own_postgres.url)
    await asyncio.to_thread(own_postgres.stop)
    writer = HistoryWriter(database.open, retry_interval_s=RETRY_S)
    await writer.start()
    try:
        writer.submit(make_result())
        await eventually(lambda: len(events(logs, "history.unavailable")) == 1)
        await asyncio.to_thread(own_postgres.start)
        await eventually(lambda: len(events(logs, "history.saved")) == 1)
    finally:
        await writer.stop()

    [prune_failed] = events(logs, "history.prune_failed")
    assert "refused" in prune_failed["error"]
    assert len(stored(database)) == 1
