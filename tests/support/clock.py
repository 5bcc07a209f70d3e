"""A clock that a test moves by hand, for the API's caches (they read ``time.monotonic``
unless given another clock): what they keep and for how long, on a fast machine and a slow
one alike."""

from __future__ import annotations

import pytest


class FakeClock:
    """Seconds that pass only when :meth:`advance` says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def install_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One :class:`FakeClock` for this process's key cache, job status cache and model cache
    (put back when ``monkeypatch`` is undone)."""
    from api.auth import key_cache
    from api.model_cache import model_cache
    from api.status_cache import status_cache

    clock = FakeClock()
    for cache in (key_cache, status_cache, model_cache):
        monkeypatch.setattr(cache, "clock", clock)
    return clock
