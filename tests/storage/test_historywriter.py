from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relayprobe.reports.result import new_result_id
from relayprobe.storage.historywriter import HistoryWriter
from relayprobe.storage.store import DATABASE_NAME, HistoryEntry, HistoryStore
from tests.storage.test_store import DEADLINE_S, NOW, make_result

NOBODY = 65534


def wait_until(condition: Callable[[], bool], *, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


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


def stored(state_dir: Path) -> list[HistoryEntry]:
    with HistoryStore(state_dir) as store:
        return store.recent(limit=1000)


async def test_writer_saves_what_is_submitted(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.stop()

    assert [entry.accepted for entry in stored(tmp_path)] == [2, 1, 0]
    assert [entry["log_level"] for entry in logs] == ["debug"] * 3


async def test_writer_stores_the_result_id_as_the_public_id(tmp_path: Path) -> None:
    result = make_result(result_id=new_result_id())
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    writer.submit(result)
    await writer.stop()

    assert [entry.public_id for entry in stored(tmp_path)] == [result.result_id]


async def test_writer_drops_and_logs_when_the_queue_is_full(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path, queue_size=2)
    for accepted in range(3):
        writer.submit(make_result(accepted=accepted))
    await writer.start()
    await writer.stop()

    assert [entry.accepted for entry in stored(tmp_path)] == [1, 0]
    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "warning",
            "reason": "queue full",
            "target": "192.0.2.4",
        }
    ]


async def test_writer_drops_and_logs_after_stop(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    await writer.stop()
    writer.submit(make_result())

    assert stored(tmp_path) == []
    assert [entry["reason"] for entry in events(logs, "history.dropped")] == ["writer stopped"]


async def test_stop_without_start_logs_what_is_dropped(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    writer = HistoryWriter(state_dir=tmp_path / "state")
    writer.submit(make_result())
    await writer.stop()

    assert events(logs, "history.dropped") == [
        {
            "event": "history.dropped",
            "log_level": "error",
            "reason": "writer not started",
            "count": 1,
        }
    ]
    assert not (tmp_path / "state").exists()


async def test_writer_logs_a_result_it_cannot_store_and_goes_on(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    twice = make_result(result_id=new_result_id())
    writer = HistoryWriter(state_dir=tmp_path)
    await writer.start()
    writer.submit(make_result(target="not an address\x1b[2J"))
    writer.submit(twice)
    writer.submit(twice)
    writer.submit(make_result())
    await writer.stop()

    assert len(stored(tmp_path)) == 2
    not_an_address, stored_twice = events(logs, "history.save_failed")
    assert not_an_address["target"] == "not an address\\x1b[2J"
    assert "does not appear to be" in not_an_address["error"]
    assert "UNIQUE" in stored_twice["error"]


async def test_writer_prunes_at_start_and_then_periodically(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    with HistoryStore(tmp_path) as store:
        store.save(make_result(started_at=long_ago))
    writer = HistoryWriter(state_dir=tmp_path, retention_days=30, prune_interval_s=0.05)
    await writer.start()
    try:
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.pruned")) == 1)
        writer.submit(make_result(started_at=long_ago))
        writer.submit(make_result())
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.pruned")) == 2)
    finally:
        await writer.stop()

    assert [entry.started_at for entry in stored(tmp_path)] == [NOW]


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


async def test_locked_database_is_logged_without_blocking_the_loop(
    tmp_path: Path, logs: list[MutableMapping[str, Any]], loop_lag: list[float]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer = HistoryWriter(state_dir=tmp_path, busy_timeout_s=0.2)
    await writer.start()
    try:
        started = time.perf_counter()
        for accepted in range(3):
            writer.submit(make_result(accepted=accepted))
        submitting_s = time.perf_counter() - started
        await asyncio.to_thread(wait_until, lambda: len(events(logs, "history.save_failed")) == 3)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    writer.submit(make_result(accepted=7))
    await writer.stop()

    assert submitting_s < 0.01
    assert loop_lag[0] < 0.05
    assert [entry.accepted for entry in stored(tmp_path)] == [7]
    failures = events(logs, "history.save_failed")
    assert {failure["error"] for failure in failures} == {"database is locked"}
    assert {failure["log_level"] for failure in failures} == {"error"}
    assert events(logs, "history.prune_failed")[0]["error"] == "database is locked"


async def test_stop_gives_up_after_its_timeout(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    HistoryStore(tmp_path).close()
    locker = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer = HistoryWriter(state_dir=tmp_path, busy_timeout_s=0.2, stop_timeout_s=0.3)
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
    [timeout] = events(logs, "history.stop_timeout")
    assert 0 < timeout["unsaved"] < 20


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
    writer = HistoryWriter(state_dir=read_only_dir / subdirectory)
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
    writer = HistoryWriter(state_dir=read_only_dir)
    await asyncio.to_thread(int)
    with unprivileged(), pytest.raises(sqlite3.OperationalError, match="readonly database"):
        await writer.start()


async def test_state_dir_under_a_file_fails_the_start_even_for_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    writer = HistoryWriter(state_dir=tmp_path / "file" / "state")
    with pytest.raises(NotADirectoryError):
        await writer.start()


async def test_a_result_is_found_by_its_id_before_and_after_it_is_saved(tmp_path: Path) -> None:
    writer = HistoryWriter(state_dir=tmp_path)
    result = make_result(result_id=new_result_id())
    assert result.result_id is not None
    # Not started: the queue holds the result and no thread saves it yet.
    writer.submit(result)
    assert writer.unsaved(result.result_id) is result
    await writer.start()
    wait_until(lambda: writer.unsaved(result.result_id) is None)
    await writer.stop()
    (entry,) = stored(tmp_path)
    assert entry.public_id == result.result_id
