"""Database reads in flight, shared by the requests that need the same read at the same time.

The job status route (``api.status_cache``) and the key checks on the event loop
(``api.auth``) both use it: many requests that miss at once cost one read.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class Flights:
    """Database reads in flight, by what they read: requests that need the same read at the
    same time share one. Event loop only.

    Times are given by the callers, on the clock of the cache that the reads fill.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}

    def join(self, key: Hashable, now: float, not_before: float, fn: Callable[..., T],
             *args: Any) -> asyncio.Future[T]:
        """The read of ``key`` in flight if it began at ``not_before`` or later, else a new
        one that begins ``now``: ``fn(*args)`` in the thread pool."""
        running = self._running.get(key)
        if running is None or running[0] < not_before:
            future = asyncio.ensure_future(run_in_threadpool(fn, *args))
            running = self._running[key] = (now, future)
            future.add_done_callback(functools.partial(self._landed, key, running))
        return running[1]

    def __len__(self) -> int:
        return len(self._running)

    def clear(self) -> None:
        self._running.clear()

    def _landed(self, key: Hashable, running: tuple[float, asyncio.Future[Any]],
                future: asyncio.Future[Any]) -> None:
        if self._running.get(key) is running:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved: nobody may be left to await a 401 or 404
