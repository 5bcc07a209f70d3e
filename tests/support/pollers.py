"""Clients that keep polling an API while a test breaks what it depends on, and the tally of
what they were answered.

Each poller is a thread with its own keep-alive connection (``httpx.Client``), as a real
client's would be, so that a server closing connections after an error shows up as a
request sent on a closed connection. Every request ends as one :class:`Answer`: a status, or
no answer at all (the connection was closed, refused or timed out).

    polls = Pollers(stack.base_url, stack.key, paths=lambda: [...])
    with polls.running(threads=3):
        ...                                  # kill and restart servers
    assert polls.tally().no_answer == []
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

# The error codes of a dependency that does not answer (``shared.errors``).
DEPENDENCY_CODES = frozenset({"database_unavailable", "broker_unavailable",
                              "storage_unavailable"})
STALE_HEADER = "X-Lorafleet-Stale"


@dataclass(frozen=True)
class Answer:
    """One request: its path, the status (``None``: no answer) and what was wrong with it."""

    path: str
    status: int | None
    problem: str | None = None  # the exception, or how a 503 breaks the contract
    stale: bool = False  # served from a cache while the database was away
    at: float = 0.0  # time.monotonic() when it ended
    code: str | None = None  # an error answer's ``error.code`` (OpenAI's shape)

    def __str__(self) -> str:
        return f"{self.path} -> {self.status}" + (f" ({self.problem})" if self.problem else "")


def check_503(answer: httpx.Response) -> str | None:
    """What is wrong with a 503 answer, or ``None``: it must say when to retry and carry
    OpenAI's error shape (``/health`` answers its own report of the parts)."""
    if not (answer.headers.get("Retry-After") or "").isdigit():
        return "503 without a Retry-After in seconds"
    try:
        body = answer.json()
    except ValueError:
        return f"503 whose body is not JSON: {answer.text[:200]!r}"
    if answer.request.url.path == "/health":
        return None if body.get("status") == "degraded" else f"/health 503 body: {body}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"503 not in OpenAI's error shape: {body}"
    if error["code"] not in DEPENDENCY_CODES:
        return f"503 with code {error['code']!r}"
    return None


def error_code(answer: httpx.Response) -> str | None:
    """The ``error.code`` of an error answer in OpenAI's shape; None for any other answer."""
    if answer.status_code < 400:
        return None
    try:
        error = answer.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class Tally:
    """What the pollers were answered, by kind."""

    answers: list[Answer]
    by_status: Counter[int | None] = field(default_factory=Counter)
    no_answer: list[Answer] = field(default_factory=list)
    errors: list[Answer] = field(default_factory=list)  # 500s, and any status not allowed
    bad_503: list[Answer] = field(default_factory=list)
    stale: list[Answer] = field(default_factory=list)

    def __str__(self) -> str:
        counts = ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items(),
                                                          key=lambda kv: str(kv[0])))
        examples = [str(a) for a in (self.no_answer + self.errors + self.bad_503)[:10]]
        return (f"{len(self.answers)} requests ({counts}); {len(self.stale)} stale"
                + ("; e.g. " + "; ".join(examples) if examples else ""))


class Pollers:
    """Threads that GET ``paths()`` in turn (re-read each round, so a test may add jobs),
    each request checked against ``allowed(path)``: the statuses that path may answer.

    Args:
        base_url: the API.
        key: the API key sent as ``Authorization: Bearer``.
        paths: the paths to poll; each poller walks the list from a different place.
        allowed: the statuses a path may answer (default: 200, and 503 as :func:`check_503`
            wants it).
        pause: seconds between a poller's requests.
    """

    def __init__(self, base_url: str, key: str, paths: Callable[[], list[str]],
                 allowed: Callable[[str], set[int]] | None = None, pause: float = 0.02,
                 timeout: float = 60.0):
        self.base_url = base_url
        self.key = key
        self.paths = paths
        self.allowed = allowed or (lambda _path: {200, 503})
        self.pause = pause
        self.timeout = timeout
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------------- running
    @contextlib.contextmanager
    def running(self, threads: int = 3) -> Iterator[Pollers]:
        self.start(threads)
        try:
            yield self
        finally:
            self.stop()

    def start(self, threads: int = 3) -> None:
        for i in range(threads):
            thread = threading.Thread(target=self._poll, args=(i,), name=f"poller-{i}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._halt.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 10)
        self._threads.clear()

    def count(self) -> int:
        """How many requests have ended so far."""
        with self._lock:
            return len(self._answers)

    def answers(self, since: float = 0.0) -> list[Answer]:
        """The answers that ended at or after ``since`` (``time.monotonic()``)."""
        with self._lock:
            return [a for a in self._answers if a.at >= since]

    def tally(self, since: float = 0.0) -> Tally:
        answers = self.answers(since)
        tally = Tally(answers)
        for a in answers:
            tally.by_status[a.status] += 1
            if a.status is None:
                tally.no_answer.append(a)
            elif a.status not in self.allowed(a.path):
                tally.errors.append(a)
            elif a.problem:
                tally.bad_503.append(a)
            if a.stale:
                tally.stale.append(a)
        return tally

    def wait_for(self, predicate: Callable[[list[Answer]], bool], since: float,
                 timeout: float = 120.0, what: str = "answers") -> None:
        """Wait until ``predicate`` holds for the answers since ``since``."""
        deadline = time.monotonic() + timeout
        while not predicate(self.answers(since)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: "
                                     f"{self.tally(since)}")
            time.sleep(0.05)

    # ----------------------------------------------------------------------- one poller
    def _poll(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout,
                          headers={"Authorization": f"Bearer {self.key}"}) as client:
            for turn in itertools.count(index):
                if self._halt.is_set():
                    return
                paths = self.paths()
                self._record(self._get(client, paths[turn % len(paths)]))
                self._halt.wait(self.pause)

    @staticmethod
    def _get(client: httpx.Client, path: str) -> Answer:
        try:
            answer = client.get(path)
        except httpx.TransportError as e:  # closed, refused, reset or timed out: no answer
            return Answer(path, None, f"{type(e).__name__}: {e}", at=time.monotonic())
        problem = check_503(answer) if answer.status_code == 503 else None
        stale = STALE_HEADER.lower() in answer.headers
        return Answer(path, answer.status_code, problem, stale, time.monotonic(),
                      error_code(answer))

    def _record(self, answer: Answer) -> None:
        with self._lock:
            self._answers.append(answer)

