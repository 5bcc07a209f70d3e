"""A running lorafleet installation for tests: the API and N Celery workers as real processes.

Every process gets its own environment (storage folder, database, broker, port, short lease
timings), runs in its own process group (so a test can SIGKILL a whole worker, pool child
included, with :meth:`Stack.kill_worker`) and logs to ``<storage>/logs/<name>.log``. The logs of
every live stack are attached to the report of a failing test (see ``tests/conftest.py``).

    with Stack(tmp_path, workers=2, settings={"lease_seconds": 5}) as stack:
        client = stack.openai()
        ...
        stack.kill_worker(0)            # SIGKILL the worker's whole process group
        stack.add_worker()              # a replacement, ready to consume
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from shared.storage import Store

from tests.support.backends import EMBEDDED, REDIS_POSTGRES, Backend
from tests.support.processes import CLI, REPO_ROOT, Proc, free_port, service_env
from tests.support.seaweedfs import SeaweedFS

FILE, S3 = "file", "s3"

__all__ = ["CLI", "DEFAULT_SETTINGS", "LIVE_STACKS", "REPO_ROOT", "Proc", "Stack", "StackError",
           "StackFactory", "free_port", "service_env"]

# Short timings so that lost workers are noticed in seconds; any field of
# ``shared.settings.Settings`` can be overridden per stack with ``settings={...}``.
DEFAULT_SETTINGS: dict[str, Any] = {
    "lease_seconds": 8,
    "heartbeat_seconds": 0.5,
    "sweep_seconds": 1,
    "requeue_after_seconds": 10,
    "retry_backoff_seconds": 0.5,
    "broker_poll_interval": 0.1,
    "device": "cpu",
}
_DEFAULT = object()

# Stacks started and not yet stopped; a failing test's report shows their logs.
LIVE_STACKS: list[Stack] = []


class StackError(RuntimeError):
    """A stack did not start; the message carries the processes' logs."""


class Stack:
    """The API and ``workers`` Celery workers, started as subprocesses.

    Args:
        root: an empty folder for the stack (storage lives in ``root/storage``).
        backend: ``"embedded"`` (SQLite + filesystem broker) or ``"redis-postgres"`` (a fresh
            PostgreSQL database and a private Redis queue; skips, or fails under ``CI``, when the
            servers are unreachable).
        storage: ``"file"`` (a folder, ``root/storage``) or ``"s3"`` (a fresh bucket of
            ``s3``, the SeaweedFS server). Default: paired with the backend, ``file`` for the
            embedded one and ``s3`` for Redis + PostgreSQL, so that the tests parametrized over
            the backends cover both stores at no extra cost. Every process gets a node cache
            of its own (``root/cache/<process>``): they share no folder but a file store.
        workers: how many workers to start (more with :meth:`add_worker`).
        settings: ``Settings`` fields for every process, e.g. ``{"max_upload_bytes": 100}``;
            merged over :data:`DEFAULT_SETTINGS`.
        env: raw environment variables for every process (``{"HF_HUB_OFFLINE": "1"}``).
        project: the project of :attr:`key`, the default API key.
        worker_pool: ``"prefork"`` (default) or ``"solo"``.
        stop_timeout: at teardown, seconds between SIGTERM and SIGKILL. Short: a worker with
            torch loaded spends seconds in interpreter shutdown, and tests don't need it.
    """

    def __init__(
        self,
        root: Path,
        *,
        backend: str = EMBEDDED,
        storage: str | None = None,
        s3: SeaweedFS | None = None,
        workers: int = 1,
        settings: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        project: str = "test",
        worker_pool: str = "prefork",
        startup_timeout: float = 90.0,
        stop_timeout: float = 5.0,
    ):
        self.root = Path(root)
        self.storage_dir = self.root / "storage"
        self.log_dir = self.storage_dir / "logs"
        self.backend_name = backend
        self.backend: Backend | None = None
        self.storage = storage or (S3 if backend == REDIS_POSTGRES else FILE)
        if self.storage == S3 and s3 is None:
            raise ValueError("an s3 stack needs the SeaweedFS server (the seaweedfs fixture)")
        self.s3 = s3
        self.bucket: str | None = None
        self.cache_root = self.root / "cache"
        self.initial_workers = workers
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.extra_env = dict(env or {})
        self.project = project
        self.worker_pool = worker_pool
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self._pools: list[str] = []
        self.key = ""
        self.keys: dict[str, str] = {}  # project -> its first key
        self._clients: list[Any] = []
        self._started = False

    # ----------------------------------------------------------------------- lifecycle
    @property
    def env(self) -> dict[str, str]:
        """The environment every service process of this stack runs with."""
        env = {f"LORAFLEET_{k.upper()}": str(v) for k, v in self.settings.items()
               if v is not None}
        env.update({
            "LORAFLEET_STORAGE_DIR": str(self.storage_dir),
            "LORAFLEET_CACHE_DIR": str(self.cache_root / "cli"),
            "LORAFLEET_HOST": "127.0.0.1",
            "LORAFLEET_PORT": str(self.port),
        })
        if self.s3 is not None and self.bucket is not None:
            env.update(self.s3.env(self.bucket, "lorafleet"))
        if self.backend is not None:
            env.update(self.backend.env)
        env.update(self.extra_env)
        return service_env(env)

    def start(self) -> Stack:
        """Start the API, create :attr:`key`, start the workers; wait until all are ready."""
        if self._started:
            return self
        self._started = True
        LIVE_STACKS.append(self)
        try:
            self.backend = Backend.provision(self.backend_name)
            if self.storage == S3:
                assert self.s3 is not None
                self.bucket = self.s3.new_bucket()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # The API migrates the schema before it answers, so it goes first: the workers
            # (and the keys command) then find the tables in place.
            self.api = self._spawn("api", [*CLI, "api"])
            self.wait_healthy()
            for _ in range(self.initial_workers):
                self.add_worker(wait=False)
            self.key = self.create_key(self.project)
            for i in range(len(self.workers)):
                self.wait_worker_ready(i)
        except BaseException as e:
            logs = self.logs_text()
            self.stop()
            if not isinstance(e, Exception):  # pytest's skip/fail, Ctrl-C
                raise
            raise StackError(f"the test stack did not start: {e}\n{logs}") from e
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every process, SIGKILL what is left after ``timeout`` (default:
        ``stop_timeout``); drop the backend's database and queue."""
        timeout = self.stop_timeout if timeout is None else timeout
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        procs = [p for p in [*self.workers, self.api] if p is not None]
        for p in procs:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            # Also reaps pool children orphaned by a killed main process.
            p.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
            p.close_log()
        if self.backend is not None:
            self.backend.cleanup()
        if self.s3 is not None and self.bucket is not None and self.s3.alive():
            with contextlib.suppress(Exception):
                self.s3.drop_bucket(self.bucket)
        if self in LIVE_STACKS:
            LIVE_STACKS.remove(self)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        own = {"LORAFLEET_CACHE_DIR": str(self.cache_root / name)}
        popen = subprocess.Popen(
            argv, cwd=REPO_ROOT, env={**self.env, **own, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return Proc(name, popen, log_path, log_file)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until ``GET /health`` answers 200."""
        assert self.api is not None
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.api.alive():
                raise StackError(f"the API exited with {self.api.popen.returncode}")
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        raise StackError(f"the API was not healthy after {timeout or self.startup_timeout}s: "
                         f"{last}")

    def add_worker(self, *, env: Mapping[str, str] | None = None, wait: bool = True,
                   pool: str | None = None) -> int:
        """Start one more worker; returns its index in :attr:`workers`."""
        index = len(self.workers)
        pool = pool or self.worker_pool
        argv = [*CLI, "worker", "--pool", pool,
                "--hostname", f"w{index}-{self.port}@%h", "--loglevel", "INFO"]
        self.workers.append(self._spawn(f"worker-{index}", argv, env))
        self._pools.append(pool)
        if wait:
            self.wait_worker_ready(index)
        return index

    def wait_worker_ready(self, index: int, timeout: float | None = None) -> None:
        """Wait until worker ``index`` consumes from the queue and, with the prefork pool, its
        pool process has imported the training stack (so a job starts training at once)."""
        proc = self.workers[index]
        marks = [" ready."] + (["ready to train"] if self._pools[index] == "prefork" else [])
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            text = proc.log()
            if all(mark in text for mark in marks):
                return
            if not proc.alive():
                raise StackError(f"{proc.name} exited with {proc.popen.returncode}")
            time.sleep(0.1)
        raise StackError(f"{proc.name} was not ready after {timeout or self.startup_timeout}s")

    def kill_worker(self, index: int, sig: int = signal.SIGKILL, *,
                    wait: float | None = 10.0) -> None:
        """Send ``sig`` to worker ``index``'s whole process group (main process and pool
        child), e.g. SIGKILL for a machine that vanishes; waits up to ``wait`` s for the main
        process to exit (``None``: don't wait)."""
        proc = self.workers[index]
        proc.signal_group(sig)
        if wait is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=wait)

    def stop_worker(self, index: int, sig: int = signal.SIGTERM, *,
                    wait: float | None = 60.0) -> int | None:
        """Send ``sig`` to worker ``index``'s main process only (what ``docker stop`` does:
        a warm shutdown that preempts the running job); returns its exit code, or ``None``
        if it was still running after ``wait`` s."""
        proc = self.workers[index]
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(sig)
        if wait is None:
            return None
        try:
            return proc.popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None

    # ----------------------------------------------------------------------- clients
    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``python -m cli.main ARGS`` with this stack's environment."""
        result = subprocess.run(
            [*CLI, *args], cwd=REPO_ROOT, env={**self.env, **(env or {})}, capture_output=True,
            text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise StackError(f"lorafleet {' '.join(args)} exited with {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
        return result

    def create_key(self, project: str | None = None, name: str = "") -> str:
        """Create an API key for ``project`` (default: the stack's) and return the secret."""
        project = project or self.project
        out = self.cli("keys", "create", "--project", project, "--name", name).stdout
        secret = out.strip().splitlines()[-1].strip()
        self.keys.setdefault(project, secret)
        return secret

    def openai(self, key: str | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
        """An ``openai.OpenAI`` client for this stack (no retries: tests see every error).

        It waits as long as the API waits for the engine (``engine_timeout_seconds``): an
        inference request may start a vLLM server, or restart one at a higher LoRA rank,
        which takes minutes on a loaded machine; a hang is still caught by pytest's timeout.
        """
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 600)
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key or self.key,
                               **kwargs)
        self._clients.append(client)
        return client

    def http(self, key: Any = _DEFAULT, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` on :attr:`base_url`, authenticated with ``key`` (default: the
        stack's key; ``None``: no Authorization header)."""
        headers = dict(kwargs.pop("headers", {}))
        key = self.key if key is _DEFAULT else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 60)
        client = httpx.Client(base_url=self.base_url, headers=headers, **kwargs)
        self._clients.append(client)
        return client

    # ----------------------------------------------------------------------- inspection
    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL the services use."""
        url = self.env.get("LORAFLEET_DATABASE_URL")
        return url or f"sqlite:///{(self.storage_dir / 'lorafleet.db').resolve()}"

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one SQL statement on the stack's database; returns the rows (if any)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def store(self) -> Store:
        """The stack's storage, as its services see it."""
        from shared.storage import make_store

        env = self.env
        return make_store(env.get("LORAFLEET_STORAGE_URL") or f"file://{self.storage_dir}",
                          endpoint_url=env.get("LORAFLEET_S3_ENDPOINT_URL", ""),
                          path_style=env.get("LORAFLEET_S3_PATH_STYLE") == "true")

    def local_folder(self, url: str) -> Path:
        """A committed storage folder (a job's ``adapter_path``, a checkpoint's ``path``) on
        this machine: the folder itself on file storage, else downloaded (and checked against
        its manifest) into the stack's folder."""
        from shared.storage import folders

        store = self.store()
        key = store.key_of(url)
        local = store.local_path(key)
        if local is not None:
            return local
        dest = self.root / "fetched" / key
        if not dest.is_dir():
            manifest = folders.read_manifest(store, key)
            folders.download_folder(store, key, dest, manifest)
        return dest

    def logs_text(self, tail: int = 120) -> str:
        """The last ``tail`` lines of every process's log, for failure reports."""
        parts = []
        for p in [self.api, *self.workers]:
            if p is None:
                continue
            lines = p.log().splitlines()[-tail:]
            state = "running" if p.alive() else f"exited {p.popen.returncode}"
            parts.append(f"----- {p.name} ({state}) {p.log_path}\n" + "\n".join(lines))
        return "\n".join(parts)


class StackFactory:
    """``factory(**kwargs)`` starts a :class:`Stack` (same arguments, minus ``root``) in a new
    temporary folder; :meth:`close` stops every stack it started (call it at fixture teardown).

    Local base models may be named from pytest's temporary folder (``models_dir``), which holds
    the ``tiny_model`` fixture and every ``tmp_path``.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, name: str,
                 request: pytest.FixtureRequest | None = None):
        self._tmp = tmp_path_factory
        self._name = name
        self._request = request
        self.stacks: list[Stack] = []

    def __call__(self, **kwargs: Any) -> Stack:
        # Local base models (the tiny model, test folders) live in pytest's temporary folder:
        # the stack's operator allows that folder (the API refuses local paths otherwise).
        kwargs["settings"] = {"models_dir": self._tmp.getbasetemp(),
                              **(kwargs.get("settings") or {})}
        storage = kwargs.get("storage") or (
            S3 if kwargs.get("backend") == REDIS_POSTGRES else FILE)
        if storage == S3 and kwargs.get("s3") is None:
            if self._request is None:
                raise ValueError("an s3 stack needs a factory made with the test's request")
            kwargs["s3"] = self._request.getfixturevalue("seaweedfs")
        stack = Stack(self._tmp.mktemp(self._name), **kwargs)
        self.stacks.append(stack)
        return stack.start()

    def close(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()


def steps_logged_by(stack: Stack, job_id: str, attempt: int) -> int:
    """How many training steps ``attempt`` of the job logged (metrics events after the
    "Attempt N started" event)."""
    return stack.sql(
        "SELECT count(*) AS n FROM job_events WHERE job_id = :id AND type = 'metrics' "
        "AND message LIKE 'Step %' AND seq > (SELECT coalesce(max(seq), 1e18) FROM job_events "
        "WHERE job_id = :id AND message LIKE :started)",
        id=job_id, started=f"Attempt {attempt} started%")[0].n
