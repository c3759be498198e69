"""The service's history writer: `HistoryStore` behind a bounded queue and a background thread.

A slow, locked or full disk costs the service a log line, never a stalled event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
import sqlite3
import threading
import time
from pathlib import Path

import structlog

from relayprobe.relaytest.sanitize import sanitize_text
from relayprobe.reports.result import TestResult
from relayprobe.storage.store import HistoryStore


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
        self._queue: queue.Queue[TestResult | None] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relayprobe-history", daemon=True)
        self._store: HistoryStore | None = None
        # Results queued and not yet saved, by public id; at most the queue's size.
        self._unsaved: dict[str, TestResult] = {}
        # A logger of its own, bound on first use, so it follows the configuration of that time.
        self._log = structlog.get_logger()

    def submit(self, result: TestResult) -> None:
        """Queue `result` for saving (under its `result_id`, or a new public ID if None)."""
        if self._stopping.is_set():
            self._log.warning("history.dropped", reason="writer stopped", target=_target(result))
            return
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self._log.warning("history.dropped", reason="queue full", target=_target(result))
            return
        if result.result_id is not None:
            self._unsaved[result.result_id] = result

    def unsaved(self, result_id: str) -> TestResult | None:
        """A result queued and not yet saved: its link works before the thread gets to it."""
        return self._unsaved.get(result_id)

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

    def _save(self, result: TestResult) -> None:
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
        finally:
            if result.result_id is not None:
                # A dict's single operations are atomic: the event loop may read it meanwhile.
                self._unsaved.pop(result.result_id, None)


def _target(result: TestResult) -> str:
    # The summary's text, not `result.target`: a result whose target is no address is logged too.
    return sanitize_text(result.summary.target)
