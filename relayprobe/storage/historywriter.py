"""The service's history writer: either backend behind a bounded queue and a background thread.

A slow, locked, full or unreachable database costs the service a log line and, past the queue's
size, counted results; never a stalled event loop or a waiting test.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from relayprobe.relaytest.sanitize import sanitize_text
from relayprobe.reports.result import TestResult
from relayprobe.storage.history import error_line, history_errors, is_unavailable
from relayprobe.storage.schema import HistoryBackend


class HistoryWriter:
    """Saves results on a background thread, in batches; `submit` never blocks and only
    `start` raises.

    `open_backend` opens the history (e.g. `functools.partial(open_history, ...)`); the writer
    keeps one open on its thread, and opens another after a failure. `start` opens it and
    prunes it to `retention_days`, and raises if it can't create or write it. After that:

    - While the database is unavailable (`history.is_unavailable`: unreachable, locked, over a
      timeout), the batch in hand is retried every `retry_interval_s`, and new results wait.
      At most `queue_size` results wait, the batch included; past that a result is dropped.
    - A result the database refuses (not storable, a public ID stored twice) is dropped; one
      refused result does not cost the rest of its batch.
    - The database is pruned every `prune_interval_s`.

    Every dropped result is logged and counted through `on_dropped(count)`, which is called on
    the event loop's thread or the writer's, and must be quick and thread-safe (a metric).
    """

    def __init__(
        self,
        open_backend: Callable[[], HistoryBackend],
        *,
        retention_days: float = 90.0,
        queue_size: int = 256,
        batch_size: int = 64,
        prune_interval_s: float = 3600.0,
        retry_interval_s: float = 1.0,
        stop_timeout_s: float = 5.0,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        if retention_days <= 0:
            raise ValueError(f"retention_days must be above 0, got {retention_days}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._open_backend = open_backend
        self._retention_days = retention_days
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._prune_interval_s = prune_interval_s
        self._retry_interval_s = retry_interval_s
        self._stop_timeout_s = stop_timeout_s
        self._on_dropped = on_dropped
        # Unbounded itself: `_pending` bounds it. None is the stop sentinel; it wakes the thread
        # when it is waiting for work.
        self._queue: queue.SimpleQueue[TestResult | None] = queue.SimpleQueue()
        # Results submitted and not yet saved or dropped: queued, or in the batch in hand.
        self._pending = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relayprobe-history", daemon=True)
        self._backend: HistoryBackend | None = None
        self.last_error: str | None = None
        """Why the database is unavailable, while it is; None while results are saved."""
        # Results pending, by public id: a result's link works before it is saved.
        self._unsaved: dict[str, TestResult] = {}
        # A logger of its own, bound on first use, so it follows the configuration of that time.
        self._log = structlog.get_logger()

    def submit(self, result: TestResult) -> None:
        """Queue `result` for saving (under its `result_id`, or a new public ID if None)."""
        if self._stopping.is_set():
            self._log.warning("history.dropped", reason="writer stopped", target=_target(result))
            self._dropped(1)
            return
        with self._lock:
            full = self._pending >= self._queue_size
            if not full:
                self._pending += 1
        if full:
            self._log.warning("history.dropped", reason="queue full", target=_target(result))
            self._dropped(1)
            return
        if result.result_id is not None:
            # Before the thread can see the result, so that it cannot be saved and popped first.
            self._unsaved[result.result_id] = result
        self._queue.put(result)

    def unsaved(self, result_id: str) -> TestResult | None:
        """A result submitted and not yet saved: its link works before the thread gets to it."""
        return self._unsaved.get(result_id)

    async def start(self) -> None:
        """Prune now, then save in the background.

        Raises one of `history.history_errors()` when the database can't be created or written,
        so that a service doesn't run with a history that can only fail. A database that is
        unavailable for now (locked, unreachable) is no such proof: it is logged, and the
        writer starts and retries.
        """
        await asyncio.to_thread(self._first_prune)
        self._thread.start()

    def _first_prune(self) -> None:
        # A backend of its own: an SQLite connection stays in the thread that opened it. The
        # prune writes (even when it removes nothing), so it fails on a read-only database too.
        try:
            with self._open_backend() as backend:
                self._prune(backend)
        except history_errors() as exc:
            if not is_unavailable(exc):
                raise
            self._log.error("history.prune_failed", error=error_line(exc))

    async def stop(self) -> None:
        """Save what is pending, waiting at most `stop_timeout_s`; the rest is dropped."""
        self._stopping.set()
        if self._thread.ident is None:
            if lost := self._abandon():
                self._log.error("history.dropped", reason="writer not started", count=lost)
                self._dropped(lost)
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, self._stop_timeout_s)
        if self._thread.is_alive():
            lost = self._abandon()
            self._log.error("history.stop_timeout", unsaved=lost)
            self._dropped(lost)

    def _abandon(self) -> int:
        """Give up on what is pending (the thread will not count it again); how many."""
        with self._lock:
            self._abandoned.set()
            lost, self._pending = self._pending, 0
        return lost

    def _dropped(self, count: int) -> None:
        if count and self._on_dropped is not None:
            self._on_dropped(count)

    def _run(self) -> None:
        next_prune = time.monotonic() + self._prune_interval_s
        stopping = False
        while not stopping and not self._abandoned.is_set():
            if time.monotonic() >= next_prune:
                self._prune_logging_failures()
                next_prune = time.monotonic() + self._prune_interval_s
            try:
                first = self._queue.get(timeout=max(0.0, next_prune - time.monotonic()))
            except queue.Empty:
                continue
            batch, stopping = self._batch(first)
            if batch:
                self._save(batch)
        self._close()

    def _batch(self, first: TestResult | None) -> tuple[list[TestResult], bool]:
        """Up to `batch_size` results from the queue, without waiting for more than `first`;
        and whether the stop sentinel came (it is queued after every result)."""
        batch: list[TestResult] = []
        item = first
        while item is not None:
            batch.append(item)
            if len(batch) == self._batch_size:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _save(self, batch: Sequence[TestResult]) -> None:
        while not self._abandoned.is_set():
            try:
                outcomes: Sequence[int | Exception] = self._open().save_batch(batch)
            except history_errors() as exc:
                if not is_unavailable(exc):
                    self._refused(batch, exc)
                    return
                self._close()
                if self.last_error is None:
                    self.last_error = error_line(exc)
                    self._log.error(
                        "history.unavailable", error=self.last_error, waiting=self._pending
                    )
                self._abandoned.wait(self._retry_interval_s)
                continue
            if self.last_error is not None:
                self.last_error = None
                self._log.info("history.recovered")
            self._finish(batch, outcomes)
            return

    def _refused(self, batch: Sequence[TestResult], exc: Exception) -> None:
        if len(batch) == 1:
            self._finish(batch, [exc])
            return
        # Which result the database refuses is not known: try each alone.
        for result in batch:
            self._save([result])

    def _finish(self, batch: Sequence[TestResult], outcomes: Sequence[int | Exception]) -> None:
        lost = 0
        for result, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, int):
                self._log.debug("history.saved", id=outcome, target=_target(result))
            else:
                lost += 1
                self._log.error(
                    "history.save_failed", target=_target(result), error=error_line(outcome)
                )
            if result.result_id is not None:
                # A dict's single operations are atomic: the event loop may read it meanwhile.
                self._unsaved.pop(result.result_id, None)
        with self._lock:
            if self._abandoned.is_set():
                return  # `stop` has counted these already
            self._pending -= len(batch)
        self._dropped(lost)

    def _open(self) -> HistoryBackend:
        if self._backend is None:
            self._backend = self._open_backend()
        return self._backend

    def _close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _prune(self, backend: HistoryBackend) -> None:
        removed = backend.prune(
            older_than_days=self._retention_days, now=datetime.datetime.now(datetime.UTC)
        )
        if removed:
            self._log.info("history.pruned", removed=removed)

    def _prune_logging_failures(self) -> None:
        try:
            self._prune(self._open())
        except history_errors() as exc:
            if is_unavailable(exc):
                self._close()
            self._log.error("history.prune_failed", error=error_line(exc))


def _target(result: TestResult) -> str:
    # The summary's text, not `result.target`: a result whose target is no address is logged too.
    return sanitize_text(result.summary.target)
