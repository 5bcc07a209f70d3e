"""A real webhook receiver for tests: a threaded HTTP server on 127.0.0.1 that records every
request and answers 503 to the first ``fail_first[path]`` sends of each event, then 200."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.processes import free_port


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """``start()`` / ``stop()`` (and start again, on the same port); ``url(path)`` to
    register; ``received`` is every request in order."""

    def __init__(self, fail_first: dict[str, int] | None = None, port: int | None = None):
        self.fail_first = dict(fail_first or {})
        self.port = port or free_port()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._answer(self.path, headers.get("webhook-id", ""))
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body, status))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"no")

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, path: str, webhook_id: str) -> int:
        with self._lock:
            seen = sum(1 for r in self.received if r.path == path and r.webhook_id == webhook_id)
        return 503 if seen < self.fail_first.get(path, 0) else 200

    def requests(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def accepted(self, path: str) -> dict[str, Received]:
        """The events answered 200 at ``path``, de-duplicated by ``webhook-id`` (the first)."""
        found: dict[str, Received] = {}
        for r in self.requests(path):
            if r.status == 200:
                found.setdefault(r.webhook_id, r)
        return found


def wait_until(predicate: Callable[[], Any], timeout: float = 120.0, what: str = "condition"
               ) -> Any:
    """Poll ``predicate`` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value
