"""Database reads kept for a few seconds, for what clients ask the API most often: a job's
status (:mod:`api.status_cache`) and the model an inference request names
(:mod:`api.model_cache`).

A value is served on the event loop (no thread pool, no session) while it is fresh: for the
cache's TTL, counted from when its read began. What every such cache guarantees:

- a write through this process, once committed, makes the cache forget the key
  (:meth:`ReadCache.forget`), and a read that began before the write is neither stored nor
  shared after it: a client reads its own writes;
- an older read never replaces a newer one;
- requests that miss at the same time share one read (:class:`~api.flights.Flights`), and a
  value past half its life is read again in the background while it is still served: a key
  asked for steadily costs about two reads per TTL, and no request waits for them;
- a read that fails (the row is gone, say) drops what it would have refreshed, so the next
  request reads again and gets the error itself;
- a cache made with ``keep_last`` also keeps each key's last value past its TTL
  (:meth:`ReadCache.last`), for a caller to serve, marked stale, while the database does not
  answer; a write forgets it as it forgets the fresh one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from api.flights import Flights

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    read_at: float  # when the read began, or the key was forgotten (on the cache's clock)
    expires: float
    value: V | None = None  # None: forgotten, the next request reads the database


class ReadCache(Generic[K, V]):
    """Key -> value read from the database, bounded to ``max_entries`` (oldest go first).

    Thread-safe: reads in the thread pool store values and writes forget keys, while the
    event loop looks them up. Reads in flight (:meth:`fetch`) live on the event loop only.

    Args:
        ttl: the seconds a value is kept (a setting, read at each use); 0 keeps nothing.
        clock: the time in seconds, as :func:`time.monotonic` gives it (tests pass their own).
        keep_last: also keep each key's last value past its TTL, for :meth:`last`.
    """

    def __init__(self, ttl: Callable[[], float], max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic, keep_last: bool = False):
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.keep_last = keep_last
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        # key -> (its last value, when that read began); None: forgotten then, by a write.
        self._last: OrderedDict[K, tuple[V | None, float]] = OrderedDict()
        self._flights = Flights()

    def lookup(self, key: K) -> V | None:
        """The stored value, unless it expired or was forgotten."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.expires <= self.clock():
            return None
        return entry.value

    def store(self, key: K, value: V, read_at: float) -> None:
        """Store a value whose database read began at ``read_at``, unless a newer read or a
        write (:meth:`forget`) came since."""
        ttl = self.ttl()
        now = self.clock()
        fresh = read_at + ttl > now
        if not fresh and not self.keep_last:
            return
        with self._lock:
            current = self._entries.get(key)
            last = self._last.get(key)
            if ((current is not None and current.read_at > read_at)
                    or (last is not None and last[1] > read_at)):
                return
            if self.keep_last:
                self._remember(key, (value, read_at))
            if fresh:
                self._put(key, _Entry(read_at, read_at + ttl, value), now)

    def forget(self, key: K) -> None:
        """Call after a write that changes ``key``'s value is committed: the next request
        reads the database, and reads that began before now are not kept."""
        now = self.clock()
        with self._lock:
            self._put(key, _Entry(now, now + self.ttl()), now)
            if self.keep_last:
                self._remember(key, (None, now))

    def last(self, key: K, max_age: float,
             usable: Callable[[V], bool] | None = None) -> tuple[V, float] | None:
        """``key``'s last value (``usable`` by the caller) and its age in seconds, counted
        from when its read began, if that is at most ``max_age``: kept past the TTL (with
        ``keep_last``) for when a fresh read fails. ``None`` after a write forgot it."""
        with self._lock:
            value, read_at = self._last.get(key, (None, 0.0))
        age = self.clock() - read_at
        if value is None or age > max_age or (usable is not None and not usable(value)):
            return None
        return value, age

    def clear(self) -> None:
        """Forget everything, reads in flight included (they belong to an event loop)."""
        with self._lock:
            self._entries.clear()
            self._last.clear()
        self._flights.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, key: K, entry: _Entry[V], now: float) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self._entries and (len(self._entries) > self.max_entries
                                 or next(iter(self._entries.values())).expires <= now):
            self._entries.popitem(last=False)

    def _remember(self, key: K, last: tuple[V | None, float]) -> None:
        self._last[key] = last
        self._last.move_to_end(key)
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)

    def _drop(self, key: K, read_at: float, usable: Callable[[V], bool] | None) -> None:
        """A read that began at ``read_at`` failed: drop the entry it would have refreshed,
        unless that is newer or not the reader's to refresh (not ``usable`` by it)."""
        with self._lock:
            current = self._entries.get(key)
            if (current is not None and current.read_at <= read_at
                    and (current.value is None or usable is None or usable(current.value))):
                del self._entries[key]

    def _read(self, key: K, began: float, read: Callable[[], V],
              usable: Callable[[V], bool] | None) -> V:
        """In the thread pool: ``read()``, stored as read at ``began``."""
        try:
            value = read()
        except Exception:
            self._drop(key, began, usable)
            raise
        self.store(key, value, began)
        return value

    async def fetch(self, key: K, read: Callable[[], V],
                    usable: Callable[[V], bool] | None = None,
                    flight: Hashable | None = None) -> V:
        """``key``'s value: the stored one while it is fresh (and ``usable``, for a value
        that only some callers may have), else ``read()`` in the thread pool, shared with
        the misses at the same time that give the same ``flight`` (default: the key). A
        stored value past half its life is read again in the background."""
        ttl = self.ttl()
        now = self.clock()
        flight = key if flight is None else flight
        with self._lock:
            entry = self._entries.get(key)
        # A read is shared only if it began after the key's last write and last stored read.
        since = max(entry.read_at, now - ttl) if entry else now - ttl
        value = entry.value if entry is not None and entry.expires > now else None
        if value is None or (usable is not None and not usable(value)):
            # Shielded: a client that goes away does not cancel the read others wait for.
            return await asyncio.shield(
                self._flights.join(flight, now, since, self._read, key, now, read, usable))
        if now - entry.read_at > ttl / 2:  # type: ignore[union-attr]  # value implies entry
            self._flights.join(flight, now, since, self._read, key, now, read, usable)
        return value
