"""Service processes for tests: their environment, their process groups, their logs."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cli.main"]

# The test run's own LORAFLEET_* variables stay out of the services, except these.
_PASS_THROUGH = ("LORAFLEET_DIALOGSUM_DIR",)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Restartable ports start here: clear of the well-known services' ports below.
RESTARTABLE_FROM = 10000


def _ephemeral_start() -> int:
    """The first port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def restartable_ports(count: int = 1, *, also: tuple[int, ...] = ()) -> list[int]:
    """``count`` free ports P (each with P + every offset of ``also`` free too) for a server
    that a test stops and starts again on the same ports. They lie below the kernel's
    ephemeral range: a port from there may be handed to some process's outgoing connection
    while the server is down, and the server could not listen on it again."""
    last = _ephemeral_start() - max(also, default=0) - 1
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(RESTARTABLE_FROM, last)
        if port not in ports and all(_bindable(port + extra) for extra in (0, *also)):
            ports.append(port)
    return ports


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment minus its ``LORAFLEET_*`` settings, offline, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LORAFLEET_") or k in _PASS_THROUGH}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        # Nothing may come from the Hugging Face Hub: fail fast instead of timing out.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    # One math thread per process: test stacks run several processes on few cores, where
    # OpenMP threads spinning against each other make tiny-model steps many times slower.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """One service process (API or worker) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def child_pids(self) -> list[int]:
        """Pids of the process's children (a prefork worker's pool child trains the job)."""
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group (the process and every child it forked)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
