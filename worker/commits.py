"""Checkpoints committed to storage in the background, while training goes on.

The Trainer writes each checkpoint to the worker's disk; :class:`Committer` then, on a thread
of its own and one checkpoint at a time:

1. uploads its files under the attempt's own prefix (several at once);
2. checks the fence: the job's row must still name this attempt as running;
3. commits it by creating its manifest (``If-None-Match: *``);
4. records it on the job's row, fenced on the attempt (:func:`shared.lifecycle.record_checkpoint`),
   which makes it the job's resume point, then applies retention.

Why this order. The fence is checked *before* the manifest is created: an attempt that lost
its lease learns it there and commits nothing. If it loses the lease in the instant between
the check and the create, the manifest it creates lies under its own attempt's prefix, which
no other attempt writes, so it replaces nothing; its record (4) is refused, and it deletes the
folder again; if it dies first, the next attempt's cleanup does (the folder is recorded
nowhere). Checked *after* the create instead, a fenced-out attempt would commit a checkpoint
and only then learn that it must take it back. Never is an unrecorded checkpoint a resume
point, nor a folder without a manifest a checkpoint.

A store or database that does not answer makes a commit retry with backoff (training goes
on meanwhile; the next checkpoint waits for this one). After :data:`RETRY_SECONDS` the commit
fails, and so does the attempt at its next step: the job is retried by the usual policy, from
its last recorded checkpoint.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from shared import lifecycle, storage
from shared.errors import StorageUnavailable
from shared.lifecycle import LeaseLost
from shared.storage import folders
from worker.training import CheckpointInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = 300.0  # how long a commit rides out an unavailable store or database
SETUP_SECONDS = 60.0  # ... and an attempt's start (its cleanup, its inputs, its resume point)
MAX_BACKOFF = 15.0


class CommitFailed(Exception):
    """A checkpoint could not be committed in time; the attempt fails and is retried."""


def with_backoff(fn: Callable[[], T], what: str, *, budget: float = RETRY_SECONDS,
                 stopped: Callable[[], bool] = lambda: False) -> T:
    """``fn()``, called again after each failure of an unavailable store or database, waiting
    longer each time, for up to ``budget`` s (or until ``stopped()``).

    Raises:
        CommitFailed: still failing after ``budget`` s.
    """
    delay, deadline = 0.5, time.monotonic() + budget
    while True:
        try:
            return fn()
        except (StorageUnavailable, OperationalError) as e:
            if time.monotonic() + delay > deadline or stopped():
                raise CommitFailed(f"{what}: storage or database unavailable for "
                                   f"{budget:.0f}s: {e}") from e
            log.warning("%s: %s; retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)


class Committer:
    """Commits one attempt's checkpoints, in order, on a background thread.

    Args:
        job_id, attempt: whose checkpoints (and the fence).
        record: records a committed checkpoint (its info, its folder) on the job's row and
            applies retention; raises :class:`LeaseLost` when the attempt no longer holds
            the job.
        lost: set when the attempt turns out to have lost its lease.
    """

    def __init__(self, job_id: str, attempt: int,
                 record: Callable[[CheckpointInfo, str], None], lost: threading.Event):
        self.job_id = job_id
        self.attempt = attempt
        self.record = record
        self.lost = lost
        self.store = storage.get_store()
        self._queue: queue.Queue[CheckpointInfo | None] = queue.Queue(maxsize=1)
        self._pending = 0  # submitted, not yet committed or failed
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.committed: list[int] = []  # steps, in order
        self._thread = threading.Thread(target=self._run, name=f"commit-{job_id}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread
    def submit(self, info: CheckpointInfo) -> None:
        """Commit ``info`` once the previous checkpoint is committed (waits for that one
        while it retries). Raises the error of an earlier commit that failed."""
        self.raise_failure()
        with self._done:
            self._pending += 1
        while True:
            try:
                self._queue.put(info, timeout=0.2)
                return
            except queue.Full:
                self.raise_failure()

    def drain(self) -> None:
        """Wait until every submitted checkpoint is committed (or failed: raised here)."""
        with self._done:
            while self._pending and self._thread.is_alive():
                self._done.wait(0.2)
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop after the commit in progress, if any; what is queued is dropped."""
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)

    # ------------------------------------------------------------------ committing thread
    def _run(self) -> None:
        while (info := self._queue.get()) is not None:
            try:
                if self._error is None and not self._closed:
                    self._commit(info)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def _commit(self, info: CheckpointInfo) -> None:
        key = storage.checkpoint_key(self.job_id, self.attempt, info.step)
        what = f"committing checkpoint-{info.step} of {self.job_id}"
        try:
            with_backoff(lambda: folders.commit_folder(
                self.store, info.path, key, meta={"step": info.step, "attempt": self.attempt},
                before_commit=self.fence), what, stopped=lambda: self._closed)
            self.record(info, key)
        except LeaseLost:
            self.lost.set()
            self.take_back(key)
            raise
        self.committed.append(info.step)
        _drop_older(info.path, keep=info.best_path)

    def fence(self) -> None:
        """Raises :class:`LeaseLost` unless the job's row still names this attempt running
        (renewing the lease on the way)."""
        if self.lost.is_set() or not lifecycle.heartbeat(self.job_id, self.attempt).alive:
            self.lost.set()
            raise LeaseLost(f"{self.job_id} attempt {self.attempt} lost its lease")

    def take_back(self, key: str) -> None:
        """Delete a folder this attempt uploaded or committed after it lost its lease."""
        try:
            folders.delete_folder(self.store, key)
        except StorageUnavailable:  # the next attempt's cleanup deletes it (unrecorded)
            log.warning("could not delete %s of a fenced attempt", key, exc_info=True)


def _drop_older(committed: Path, keep: Path | None) -> None:
    """Once a checkpoint is committed, the worker's disk needs no older one (but the best,
    which the end of training may read)."""
    for other in committed.parent.glob("checkpoint-*"):
        if other != committed and other != keep and other.is_dir():
            step = other.name.removeprefix("checkpoint-")
            if step.isdigit() and int(step) < int(committed.name.removeprefix("checkpoint-")):
                shutil.rmtree(other, ignore_errors=True)
