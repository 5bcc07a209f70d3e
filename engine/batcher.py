"""Dynamic batching: requests wait a short window, then run together as one ``generate``.

Requests come from the engine's event loop; one generation thread takes them in batches.
A batch holds requests of one base model, whatever their adapters (peft's mixed-adapter
batches), up to ``max_batch_size`` sequences. The waiting line is bounded: past
``max_queued_requests`` a request is refused at once (HTTP 429) instead of queueing forever.
The thread reports text back to each request's event loop as it is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.adapters import AdapterRef
from engine.builtin import BaseModelHost
from engine.decoding import Row
from engine.errors import AdapterLoadFailed, GenerationFailed
from shared.errors import LorafleetError, Overloaded

log = logging.getLogger(__name__)


def _load_error(error: Exception) -> LorafleetError:
    if isinstance(error, LorafleetError):  # e.g. NotFound: the folder is gone
        return error
    return AdapterLoadFailed(f"the adapter could not be loaded: {type(error).__name__}")


@dataclass(eq=False)
class Request:
    """One API request: its rows (prompts x choices) and where its results go.

    Events put on :attr:`events`: ``("prompt", index, logprobs)`` for a choice that echoes
    its prompt, ``("delta", index, text, logprobs)``, ``("finish", index, reason,
    completion_tokens, logprobs)``, then ``("done",)`` or ``("error", LorafleetError)``; the
    logprobs are the tokens' since the last event (empty unless asked).
    """

    host: BaseModelHost
    adapter: AdapterRef | None
    rows: list[Row]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def __post_init__(self) -> None:
        for row in self.rows:
            row.owner = self

    def emit(self, *event: Any) -> None:
        """Thread-safe: hand an event to the request's event loop."""
        # A closed loop (shutdown) has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    """The queue of waiting requests and the generation thread that drains it."""

    def __init__(self, window_s: float, max_batch: int, max_queued: int):
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy = False
        self.batches = 0
        self.rows_generated = 0
        self.rows_cancelled = 0  # stopped early because their client went away
        self.history: deque[dict[str, Any]] = deque(maxlen=200)
        self._batch_seconds = 1.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ event-loop side
    def submit(self, request: Request) -> None:
        """Queue a request.

        Raises:
            Overloaded: ``max_queued`` requests wait already.
        """
        with self._cond:
            if len(self._pending) >= self.max_queued:
                rows = sum(len(r.rows) for r in self._pending)
                wait = self._batch_seconds * (rows / self.max_batch + 1)
                raise Overloaded(
                    f"The server is busy ({len(self._pending)} requests waiting); retry later.",
                    retry_after=math.ceil(wait))
            self._pending.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request, or stop its rows at the next token."""
        request.cancelled = True
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for request in list(self._pending):
            request.emit("error", GenerationFailed("the engine is shutting down"))
        self._pending.clear()

    # ------------------------------------------------------------------ generation thread
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending[0]
                remaining = first.enqueued_at + self.window_s - time.monotonic()
                rows = sum(len(r.rows) for r in self._pending if r.host is first.host)
                if remaining <= 0 or rows >= self.max_batch:
                    break
                # Woken early by each new request, to see whether the batch is full.
                self._cond.wait(remaining)
            return self._take(first.host)

    def _take(self, host: BaseModelHost) -> list[Request]:
        """The oldest requests of ``host`` that fit one batch (caller holds the lock)."""
        taken: list[Request] = []
        rows = 0
        adapters: set[str] = set()
        for request in self._pending:
            if request.host is not host:
                continue
            name = request.adapter.name if request.adapter else None
            new_adapter = name is not None and name not in adapters
            if taken and (rows + len(request.rows) > self.max_batch or (
                    new_adapter and len(adapters) >= host.adapters.max_count)):
                break  # in order: the next batch starts with it
            taken.append(request)
            rows += len(request.rows)
            if name is not None:
                adapters.add(name)
        for request in taken:
            self._pending.remove(request)
        return taken

    def _execute(self, requests: list[Request]) -> None:
        host = requests[0].host
        rows = [row for r in requests for row in r.rows]
        refs = list({r.adapter.name: r.adapter for r in requests if r.adapter}.values())
        self.busy = True
        start, cpu_start = time.monotonic(), time.thread_time()
        outcome: tuple[Any, ...] = ("done",)
        try:
            failed = host.prepare(refs)
            for request in list(requests):
                if request.adapter is not None and request.adapter.name in failed:
                    request.emit("error", _load_error(failed[request.adapter.name]))
                    requests.remove(request)
            rows = [row for r in requests for row in r.rows]
            if rows:
                host.generate(
                    rows,
                    on_delta=lambda row, text: row.owner.emit("delta", row.index, text,
                                                              row.take_logprobs()),
                    on_finish=lambda row: row.owner.emit("finish", row.index,
                                                         row.finish_reason, len(row.generated),
                                                         row.take_logprobs()),
                    cancelled=lambda row: row.owner.cancelled,
                    on_prompt=lambda row, entries: row.owner.emit("prompt", row.index,
                                                                  entries),
                )
        except LorafleetError as e:
            outcome = ("error", e)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the engine
            log.exception("batch of %d rows failed", len(rows))
            outcome = ("error", GenerationFailed(f"generation failed: {type(e).__name__}"))
        seconds = time.monotonic() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.batches += 1
        self.rows_generated += len(rows)
        self.rows_cancelled += sum(row.finish_reason == "cancelled" for row in rows)
        self.history.append({"base_model": host.name, "requests": len(requests),
                             "rows": len(rows), "adapters": len(refs),
                             "seconds": round(seconds, 4),
                             # CPU time of this thread (all of it with one torch thread).
                             "cpu_seconds": round(time.thread_time() - cpu_start, 4)})
        self.busy = False
        # Last, so that a client that got its answer sees the batch in the stats.
        for request in requests:
            request.emit(*outcome)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "busy": self.busy, "batches": self.batches,
                "rows": self.rows_generated, "rows_cancelled": self.rows_cancelled,
                "recent_batches": list(self.history)[-20:]}
