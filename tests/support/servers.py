"""PostgreSQL and Redis servers of a test's own, which it may kill and start again.

The machine's servers (``LORAFLEET_TEST_POSTGRES_URL``, ``LORAFLEET_TEST_REDIS_URL``) are shared
by every test run at once: a test that stops a dependency starts its own instead.

    with PrivatePostgres() as pg, PrivateRedis(tmp_path) as redis:
        env = {"LORAFLEET_DATABASE_URL": pg.database_url("lorafleet"),
               "LORAFLEET_BROKER_URL": redis.url}
        ...
        pg.stop()           # pg_ctl stop -m immediate: a crash, open connections dropped
        pg.start()          # the same data folder: what was committed is still there
        redis.kill()        # SIGKILL: every queued message is gone (no persistence)
        redis.start()

A missing ``initdb`` or ``redis-server`` skips the test, and fails it under ``CI``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.support.backends import unavailable
from tests.support.processes import restartable_ports

# The server runs as this user when the tests run as root (PostgreSQL refuses to run as root).
POSTGRES_USER = "postgres"


def _wait(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout}s")
        time.sleep(0.05)


def postgres_bin() -> Path:
    """The newest PostgreSQL server's programs folder (``initdb``, ``pg_ctl``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        unavailable("PostgreSQL's initdb", FileNotFoundError("no /usr/lib/postgresql/*/bin"))
    return Path(initdb).parent  # type: ignore[arg-type]  # unavailable() does not return


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 at a free port.

    ``initdb`` runs once; :meth:`stop` and :meth:`start` keep the data folder, as a server
    that crashed and came back would. Run as the ``postgres`` user when the tests run as
    root (the folder is created outside pytest's private temporary folder for that reason).
    """

    def __init__(self, port: int | None = None):
        self.port = port or restartable_ports()[0]
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.root, POSTGRES_USER, POSTGRES_USER)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def database_url(self, name: str) -> str:
        """Create database ``name`` (if new); its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                if conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                               {"n": name}) is None:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def start(self) -> None:
        """Start the server on the same port and data folder; returns once it accepts
        connections."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                  "-w", "-t", "120", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m immediate`` (default): every backend dies at once, clients see
        their connections drop, and the next start recovers from the WAL."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            argv = ["su", POSTGRES_USER, "-c", shlex.join(argv)]
        result = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} exited with {result.returncode}:\n"
                               f"{result.stdout}\n{result.stderr}\n{log}")


class PrivateRedis:
    """A ``redis-server`` of this test alone, without persistence: after :meth:`kill` and
    :meth:`start` it is empty, as a cache node that crashed would be."""

    def __init__(self, workdir: Path, port: int | None = None):
        if shutil.which("redis-server") is None:
            unavailable("redis-server", FileNotFoundError("redis-server is not on PATH"))
        self.port = port or restartable_ports()[0]
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server; returns once it answers PING."""
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self._log or (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            _wait(lambda: _pings(client), 30, "redis-server")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL it: every queued message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    stop = kill

    def restart(self, down_for: float = 1.0) -> None:
        """Kill it, leave it down for ``down_for`` s, start it again (empty)."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False
