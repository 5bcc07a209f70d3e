"""Fixtures and helpers for the resilience tests: who runs a job, the fencing record, a
private Redis server that a test may restart, and a worker whose checkpoint saves are slow.

Every test here starts its own stack (``make_stack``) because it kills, stops or freezes
processes. Timings are short (``FAST_LEASE``) so that a lost worker is noticed in seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import EMBEDDED
from tests.support.seaweedfs import SeaweedFS
from tests.support.servers import PrivateRedis
from tests.support.stack import Stack

HERE = Path(__file__).resolve().parent
# Lease timings of the resilience stacks: a worker is declared lost after 5 s of silence.
FAST_LEASE: dict[str, Any] = {
    "lease_seconds": 5,
    "heartbeat_seconds": 0.5,
    "sweep_seconds": 0.5,
    "retry_backoff_seconds": 0.5,
    "requeue_after_seconds": 5,
}


# One torch thread per worker: two workers (and the test) share two cores, and torch's
# spinning thread pools slow each other down many times over when cores are oversubscribed.
WORKER_ENV = {"OMP_NUM_THREADS": "1"}


def start_stack(factory: Any, tiny_model: Path, *, workers: int = 2, backend: str = EMBEDDED,
                env: dict[str, str] | None = None, storage: str | None = None,
                s3: SeaweedFS | None = None, **settings: Any) -> Stack:
    """A stack from ``factory`` (``make_stack`` or ``make_module_stack``) with
    :data:`FAST_LEASE` timings (overridden by ``settings``) that accepts the tiny model.
    ``storage`` and ``s3``: as :class:`~tests.support.stack.Stack` takes them."""
    return factory(workers=workers, backend=backend, env={**WORKER_ENV, **(env or {})},
                   storage=storage, s3=s3,
                   settings={**FAST_LEASE, "models_dir": str(tiny_model.parent), **settings})


def ensure_workers(stack: Stack, n: int = 2, wait: bool = True) -> list[int]:
    """Start replacements until ``n`` workers are alive (killed ones stay dead); returns the
    indexes of the live workers. ``wait``: until each is ready to take a job."""
    live = [i for i, p in enumerate(stack.workers) if p.alive()]
    while len(live) < n:
        live.append(stack.add_worker(wait=False))
    if wait:
        for i in live:
            stack.wait_worker_ready(i)
    return live


def restart_api(stack: Stack) -> None:
    """Stop the API (SIGTERM) and start it again on the same port."""
    from tests.support.stack import CLI

    assert stack.api is not None
    stack.api.popen.send_signal(signal.SIGTERM)
    stack.api.popen.wait(timeout=30)
    stack.api.close_log()
    stack.api = stack._spawn("api", [*CLI, "api"])
    stack.wait_healthy()


# The training of the resilience jobs: 12 logged steps, a checkpoint every 4, dropout on
# (so that the dropout RNG must be restored for a resume to be exact).
JOB: dict[str, Any] = {
    "max_steps": 12,
    "save_steps": 4,
    "logging_steps": 1,
    "batch_size": 4,
    "max_length": 1024,
    "seed": 1234,
    "learning_rate": 1e-3,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
}


def wait_until(predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def job_row(stack: Stack, job_id: str) -> Any:
    """The job's row, read straight from the database (lease fields included)."""
    rows = stack.sql("SELECT status, attempt, failures, lease_owner, last_good_step, "
                     "last_good_checkpoint, progress, "
                     "resumed_from_step, not_before, error FROM jobs WHERE id = :id", id=job_id)
    return rows[0]


def progress_step(stack: Stack, job_id: str) -> int:
    """The last training step the running attempt reported (0 before the first)."""
    import json

    progress = job_row(stack, job_id).progress
    if isinstance(progress, str):
        progress = json.loads(progress)
    return int((progress or {}).get("step") or 0)


def owner_index(stack: Stack, job_id: str) -> int | None:
    """The index of the worker whose process trains ``job_id`` now (``None``: nobody)."""
    owner = job_row(stack, job_id).lease_owner
    if not owner:
        return None
    pid = int(owner.rsplit(":", 1)[1])
    for i, proc in enumerate(stack.workers):
        if proc.alive() and (pid == proc.pid or pid in proc.child_pids()):
            return i
    return None


def attempts(stack: Stack, job_id: str) -> list[Any]:
    """The job's fencing record: one row per claim, oldest first."""
    return stack.sql("SELECT attempt, worker, started_at, ended_at, last_seen_at, outcome, "
                     "start_step FROM job_attempts WHERE job_id = :id ORDER BY attempt",
                     id=job_id)


def assert_never_concurrent(stack: Stack, job_id: str) -> list[Any]:
    """No two attempts of ``job_id`` held it at the same time.

    An attempt counts as live from its claim until it ended or, for a worker that vanished,
    until its last heartbeat (the lease ran out after that, and only then could the next claim
    happen). Returns the attempts.
    """
    rows = attempts(stack, job_id)
    spans = sorted((r.started_at, r.ended_at or r.last_seen_at or r.started_at, r.attempt)
                   for r in rows)
    for (_s1, e1, a1), (s2, _e2, a2) in zip(spans, spans[1:], strict=False):
        assert e1 <= s2, (f"{job_id}: attempt {a1} was live until {e1:.3f}, attempt {a2} "
                          f"started at {s2:.3f}")
    assert [r.attempt for r in rows] == list(range(1, len(rows) + 1))
    return rows


def train_losses(events: list[Any], after_resume: bool = False) -> dict[int, float]:
    """``{step: train_loss}`` from a job's metrics events (oldest first). ``after_resume``:
    only those logged after the last "Resumed from checkpoint" event."""
    if after_resume:
        marks = [i for i, e in enumerate(events) if e.message.startswith("Resumed from ")]
        assert marks, "the job was never resumed"
        events = events[marks[-1] + 1:]
    return {e.data["step"]: e.data["train_loss"] for e in events
            if e.type == "metrics" and "train_loss" in (e.data or {})}


def adapter_tensors(path: str | Path) -> dict[str, Any]:
    """The tensors of a saved adapter (``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- private Redis
@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A fresh ``redis-server`` on a free port for one module; never the shared one."""
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


# --------------------------------------------------------------------------- slow saves
SLOW_SAVE_DIR = HERE / "slow_save"


def slow_save_env(seconds: float) -> dict[str, str]:
    """Environment for :meth:`Stack.add_worker` that makes the worker pause ``seconds`` inside
    every checkpoint save, after the files are written and before the save is marked complete
    (see ``slow_save/sitecustomize.py``)."""
    from tests.support.stack import REPO_ROOT

    path = os.pathsep.join([str(SLOW_SAVE_DIR), str(REPO_ROOT)])
    return {"PYTHONPATH": path, "LORAFLEET_TEST_SLOW_SAVE_SECONDS": str(seconds)}


def save_gate_env(gate: Path) -> dict[str, str]:
    """Environment for :meth:`Stack.add_worker` that holds the save of checkpoint N while
    ``gate/hold-N`` exists (``gate/waiting-N`` appears once the worker is held there)."""
    from tests.support.stack import REPO_ROOT

    path = os.pathsep.join([str(SLOW_SAVE_DIR), str(REPO_ROOT)])
    return {"PYTHONPATH": path, "LORAFLEET_TEST_SAVE_GATE": str(gate)}


def commit_gate_env(gate: Path) -> dict[str, str]:
    """:func:`save_gate_env`, and the commit of checkpoint N to storage held while
    ``gate/hold-commit-N`` exists, its files uploaded and its manifest not yet written
    (``gate/waiting-commit-N`` appears once the worker is held there)."""
    return {**save_gate_env(gate), "LORAFLEET_TEST_COMMIT_GATE": str(gate)}


def kill_owner(stack: Stack, job_id: str, sig: int = signal.SIGKILL, *,
               replace: bool = True) -> int:
    """SIGKILL (or ``sig``) the whole worker that trains ``job_id``; returns its index.
    ``replace``: start a replacement worker at once (it gets ready while the test goes on)."""
    index = wait_until(lambda: _some(owner_index(stack, job_id)), timeout=60,
                       what=f"the worker of {job_id}")[0]
    stack.kill_worker(index, sig, wait=None if sig == signal.SIGSTOP else 10)
    if replace and sig != signal.SIGSTOP:
        stack.add_worker(wait=False)
    return index


def freeze_owner(stack: Stack, job_id: str, tries: int = 50) -> int:
    """SIGSTOP the whole worker that trains ``job_id`` at a moment it holds no write lock on
    the database; returns its index. A process stopped inside a write transaction keeps the
    lock until it runs again (README, "A frozen worker"), so the freeze is retried, after a
    moment's SIGCONT, until the database takes a write from another process."""
    for _ in range(tries):
        index = kill_owner(stack, job_id, signal.SIGSTOP)
        if database_takes_a_write(stack):
            return index
        stack.workers[index].signal_group(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"the worker of {job_id} held a write lock at every one of {tries} "
                         "freezes")


def database_takes_a_write(stack: Stack, wait: float = 2.0) -> bool:
    """Whether another process can start a write transaction within ``wait`` s."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    url = stack.database_url
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"timeout": wait} if sqlite else {})
    try:
        with engine.connect() as conn:
            if sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql(f"SET lock_timeout = {int(wait * 1000)}")
                conn.exec_driver_sql("SELECT 1 FROM jobs FOR UPDATE")
            conn.rollback()
        return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def kill_pool_process(stack: Stack, job_id: str) -> int:
    """SIGKILL only the pool process that trains ``job_id`` (what the out-of-memory killer
    does); the worker's main process survives and forks a new one. Returns the pid killed."""
    owner = wait_until(lambda: (r := job_row(stack, job_id)).status == "running"
                       and r.lease_owner, timeout=60, what=f"the process of {job_id}")
    pid = int(owner.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    return pid


def _some(value: Any) -> tuple[Any] | None:
    """``(value,)`` unless ``value`` is None: lets :func:`wait_until` wait for a 0."""
    return None if value is None else (value,)
