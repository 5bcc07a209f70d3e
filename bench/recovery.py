"""Recovery after a lost worker: ``python -m bench.recovery [--trials 3] [--write]``.

One job trains on a real installation (the API and two Celery workers, embedded backend) with
the service's DEFAULT lease timings (``shared.settings``). Several times in its life the worker
that trains it is SIGKILLed (process group: the machine is gone), each time just before its
next checkpoint, the worst moment; a replacement worker is started at once, and the surviving
worker picks the job up. Per kill it measures:

- detected: SIGKILL → the sweeper re-queued the job (the lease ran out),
- claimed: SIGKILL → another worker claimed it,
- first step: SIGKILL → the new attempt reported its first training step,
- steps lost: the step reached at the kill minus the step resumed from (≤ ``save_steps``).

``--write`` puts the table into the "Recovery" section of BENCHMARKS.md. Timings are
wall-clock on whatever else the machine is doing (the load average goes into the table).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``python bench/recovery.py``
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from shared.settings import Settings  # noqa: E402

SECTION = "Recovery"
# The lifecycle timings under test: the service defaults, whatever the test stacks use.
TIMINGS = ("lease_seconds", "heartbeat_seconds", "sweep_seconds", "retry_backoff_seconds",
           "requeue_after_seconds")
GOAL_SECONDS = 30.0


@dataclass
class Trial:
    killed_at_step: int
    resumed_from: int
    detected: float
    claimed: float
    first_step: float

    @property
    def lost(self) -> int:
        return self.killed_at_step - self.resumed_from


def _log(msg: str) -> None:
    print(msg, flush=True)


def _row(stack: Any, job_id: str) -> Any:
    return stack.sql("SELECT status, attempt, lease_owner, last_good_step, progress, "
                     "resumed_from_step FROM jobs WHERE id = :id", id=job_id)[0]


def _step(row: Any) -> int:
    progress = json.loads(row.progress) if isinstance(row.progress, str) else row.progress
    return int((progress or {}).get("step") or 0)


def _owner(stack: Any, row: Any) -> int | None:
    if not row.lease_owner:
        return None
    pid = int(row.lease_owner.rsplit(":", 1)[1])
    for i, proc in enumerate(stack.workers):
        if proc.alive() and (pid == proc.pid or pid in proc.child_pids()):
            return i
    return None


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def run(trials: int, save_steps: int, work: Path, threads: int, *,
        stack_options: dict[str, Any] | None = None) -> tuple[list[Trial], dict]:
    """Run one job through ``trials`` worker kills; returns the trials and the settings.

    Args:
        stack_options: more :class:`~tests.support.stack.Stack` arguments (its storage: an
            S3 bucket instead of the folder).
    """
    from tests.support.jobs import create_job, upload_dialogsum
    from tests.support.stack import Stack
    from worker.tiny_model import build_tiny_model

    defaults = Settings.model_fields
    timings = {name: defaults[name].default for name in TIMINGS}
    model = build_tiny_model(work / "model")
    # Each kill counts as a failed attempt: allow one more than the kills.
    settings = {**timings, "broker_poll_interval": defaults["broker_poll_interval"].default,
                "max_attempts": trials + 1, "device": "cpu", "models_dir": str(model.parent)}
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    max_steps = save_steps * (2 * trials + 2)
    results: list[Trial] = []
    with Stack(work / "stack", workers=2, settings=settings, env=env,
               **(stack_options or {})) as stack:
        client = stack.openai()
        file = upload_dialogsum(client, 48)
        job = create_job(client, str(model), file.id, max_steps=max_steps,
                         save_steps=save_steps, logging_steps=1, batch_size=4,
                         max_length=1024, lora={"r": 4, "alpha": 8})
        for n in range(trials):
            trial = _one_kill(stack, job.id, save_steps)
            results.append(trial)
            _log(f"kill {n + 1}: at step {trial.killed_at_step}, resumed from "
                 f"{trial.resumed_from} (lost {trial.lost}); detected {trial.detected:.1f}s, "
                 f"claimed {trial.claimed:.1f}s, first new step {trial.first_step:.1f}s")
    return results, {**timings, "max_attempts": trials + 1, "save_steps": save_steps,
                     "omp_threads": threads or "default"}


def _one_kill(stack: Any, job_id: str, save_steps: int) -> Trial:
    """Kill the worker of ``job_id`` just before its next checkpoint; time the recovery."""
    from tests.support.stack import steps_logged_by

    # The attempt running now saves a checkpoint of its own, then trains on to the step just
    # before the next one: a kill then loses the most work.
    start = _wait(lambda: (r := _row(stack, job_id)).status == "running"
                  and _step(r) > (r.resumed_from_step or 0) and r, 300, "training")
    floor = max(start.resumed_from_step or 0, _step(start))
    target = _wait(lambda: (r := _row(stack, job_id)).last_good_step
                   and r.last_good_step > floor and r, 300, "a new checkpoint")
    kill_step = target.last_good_step + save_steps - 1
    row = _wait(lambda: (r := _row(stack, job_id)) and _step(r) >= kill_step and r,
                300, f"step {kill_step}")
    index = _owner(stack, row)
    if index is None:
        raise RuntimeError(f"no live worker owns {job_id}: {row}")
    attempt, killed_at = row.attempt, _step(row)
    t0 = time.time()
    stack.kill_worker(index, signal.SIGKILL, wait=None)
    stack.add_worker(wait=False)
    _wait(lambda: steps_logged_by(stack, job_id, attempt + 1), 300, "the first new step")
    t_step = time.time()
    new = _row(stack, job_id)
    lost, claimed = (stack.sql("SELECT ended_at, started_at FROM job_attempts WHERE "
                               "job_id = :id AND attempt = :a", id=job_id, a=a)[0]
                     for a in (attempt, new.attempt))
    return Trial(killed_at, new.resumed_from_step, lost.ended_at - t0, claimed.started_at - t0,
                 t_step - t0)


def markdown(trials: list[Trial], used: dict, where: str, loads: tuple[str, str]) -> str:
    rows = [[str(i + 1), str(t.killed_at_step), str(t.resumed_from), str(t.lost),
             f"{t.detected:.1f}", f"{t.claimed:.1f}", f"{t.first_step:.1f}"]
            for i, t in enumerate(trials)]
    first = [t.first_step for t in trials]
    settings = ", ".join(f"{k}={v}" for k, v in used.items())
    return "\n".join([
        f"## {SECTION}",
        "",
        "`python -m bench.recovery`: a job's worker is SIGKILLed (whole process group, just "
        "before its next checkpoint) and the job resumes on another worker. Times are seconds "
        "from the SIGKILL. Goal: first new step within "
        f"{GOAL_SECONDS:.0f} s, at most `save_steps` steps lost.",
        "",
        f"- Machine: {where}; load average {loads[0]} before, {loads[1]} after; "
        f"{report.stamp()}.",
        f"- Settings: {settings} (the service defaults, but for max_attempts: every kill is a "
        "failed attempt). Embedded backend (SQLite, filesystem broker), tiny model, two "
        "workers plus a replacement started at each kill.",
        "",
        report.table(["kill", "at step", "resumed from", "steps lost", "re-queued (s)",
                      "claimed (s)", "first new step (s)"], rows),
        "",
        f"First new step: median {statistics.median(first):.1f} s, worst {max(first):.1f} s; "
        f"steps lost at most {max(t.lost for t in trials)} (save_steps "
        f"{used['save_steps']}). The wait is the lease ({used['lease_seconds']} s without a "
        "heartbeat) plus up to one sweep, then the retry backoff, which doubles with each "
        f"failed attempt ({used['retry_backoff_seconds']} s, then twice that...), and the "
        "sweep that sends the job; loading the model and the cached data set takes the rest.",
    ])


def write_section(md: str, path: Path = report.BENCHMARKS) -> None:
    """Replace (or append) the ``## Recovery`` section of BENCHMARKS.md, nothing else."""
    report.replace_section(SECTION, md, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="worker kills (default 3)")
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the workers (0: torch's default); two "
                        "workers share the machine")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the installation (logs, database) in this folder")
    args = parser.parse_args(argv)
    where, load0 = report.machine(), report.load()
    _log(f"recovery benchmark: {where}")
    with tempfile.TemporaryDirectory(prefix="lorafleet-recovery-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trials, used = run(args.trials, args.save_steps, work, args.threads)
    md = markdown(trials, used, where, (load0, report.load()))
    _log("\n" + md)
    if args.write:
        write_section(md)
    worst = max(t.first_step for t in trials)
    ok = worst <= GOAL_SECONDS and all(t.lost <= args.save_steps for t in trials)
    _log(f"\nrecovery: worst first new step {worst:.1f}s "
         f"({'within' if ok else 'OVER'} the {GOAL_SECONDS:.0f}s goal)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
