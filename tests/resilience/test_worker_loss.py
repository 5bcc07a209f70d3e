"""Workers that die, freeze, crash in a loop or are told to stop, on the embedded backend.

The tests share one stack (two workers; a worker a test kills is replaced by the next test)
and run one after another: each leaves no job running behind it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from shared import storage
from shared.storage import folders
from tests.resilience.conftest import (
    JOB,
    adapter_tensors,
    assert_never_concurrent,
    attempts,
    ensure_workers,
    freeze_owner,
    job_row,
    kill_owner,
    kill_pool_process,
    max_abs_diff,
    owner_index,
    progress_step,
    start_stack,
    train_losses,
    wait_until,
)
from tests.support import Stack, create_job, list_all_events, upload_dialogsum, wait_for_status
from tests.support.preference import upload_preference
from tests.support.stack import steps_logged_by

pytestmark = pytest.mark.e2e

BACKOFF = 2.0  # retry_backoff_seconds: long enough to cancel a job while it waits for it


@pytest.fixture(scope="module")
def stack(make_module_stack: Any, tiny_model: Path) -> Stack:
    return start_stack(make_module_stack, tiny_model, retry_backoff_seconds=BACKOFF)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.openai()


@pytest.fixture(scope="module")
def file_id(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 48).id


@pytest.fixture(scope="module")
def pairs_id(client: openai.OpenAI) -> str:
    """The same dialogues as preference pairs, for DPO jobs."""
    return upload_preference(client, 48).id


@pytest.fixture(autouse=True)
def two_workers(stack: Stack) -> list[int]:
    """Every test starts with two live workers: those an earlier test killed were replaced
    (the replacements may still be starting up)."""
    return ensure_workers(stack, 2, wait=False)


def wait_mid_training(stack: Stack, job_id: str, checkpoint: int = 4) -> int:
    """Wait until ``checkpoint`` is recorded and training went past it; returns the step."""
    wait_until(lambda: (job_row(stack, job_id).last_good_step or 0) >= checkpoint
               and progress_step(stack, job_id) > checkpoint,
               what=f"checkpoint-{checkpoint} of {job_id} and a step past it")
    return progress_step(stack, job_id)


# Batches of 4 examples; token-budget batches (9 per epoch here: the run crosses an epoch); a
# DPO job (TRL's trainer, the same checkpoint save and resume).
@pytest.mark.parametrize("options", [{}, {"max_tokens_per_batch": 2048},
                                     {"method": {"type": "dpo"}}],
                         ids=["fixed-batches", "token-budget", "dpo"])
def test_sigkill_mid_training_resumes_exactly(stack: Stack, client: openai.OpenAI,
                                              file_id: str, pairs_id: str, tiny_model: Path,
                                              options: dict[str, Any]) -> None:
    """The same job twice (same data, seed, dropout 0.1): one runs through, the other's worker
    is SIGKILLed after its first checkpoint. Resumed on another worker, it logs the same loss at
    every step after the resume and saves the same adapter."""
    data = pairs_id if "method" in options else file_id
    reference = create_job(client, str(tiny_model), data, **JOB, **options)
    victim = create_job(client, str(tiny_model), data, **JOB, **options)

    killed_at = wait_mid_training(stack, victim.id)
    kill_owner(stack, victim.id, signal.SIGKILL)

    resumed = wait_for_status(client, victim.id, "succeeded", timeout=180)
    ref = wait_for_status(client, reference.id, "succeeded", timeout=180)
    ref_losses = train_losses(list_all_events(client, ref.id))
    resumed_losses = train_losses(list_all_events(client, victim.id), after_resume=True)
    diff = max_abs_diff(adapter_tensors(resumed.adapter_path), adapter_tensors(ref.adapter_path))

    assert killed_at < JOB["max_steps"], "killed in the middle of training"
    assert resumed.method.type == options.get("method", {}).get("type", "supervised")
    assert resumed.model_extra["max_tokens_per_batch"] == options.get("max_tokens_per_batch")
    assert (resumed.attempt, ref.attempt) == (2, 1)
    assert resumed.resumed_from_step in (4, 8)
    assert sorted(resumed_losses) == list(range(resumed.resumed_from_step + 1,
                                                JOB["max_steps"] + 1))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(ref_losses[step], abs=1e-6), f"train_loss at step {step}"
    assert diff <= 1e-6
    assert_never_concurrent(stack, victim.id)


def test_sigterm_preempts_at_the_current_step(stack: Stack, client: openai.OpenAI,
                                             file_id: str, tiny_model: Path) -> None:
    """SIGTERM to a worker (``docker stop``): checkpoint at the current step, job back in the
    queue without a failure, the worker exits by itself; another worker resumes from that step.
    ``save_steps`` is beyond the end, so the only checkpoint is the preemption's own."""
    job = create_job(client, str(tiny_model), file_id, **{**JOB, "save_steps": 100})

    wait_until(lambda: progress_step(stack, job.id) >= 2, what="step 2")
    index = owner_index(stack, job.id)
    assert index is not None
    signalled_at = progress_step(stack, job.id)
    exit_code = stack.stop_worker(index, signal.SIGTERM, wait=60)
    stack.add_worker(wait=False)

    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    rows = assert_never_concurrent(stack, job.id)
    events = list_all_events(client, job.id)
    released = [e for e in events if e.message.startswith("Worker shutting down (preempted)")]
    listed = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]

    assert exit_code == 0, "the worker gave the job back and exited by itself"
    assert len(released) == 1
    step = released[0].data["step"]
    assert signalled_at <= step < JOB["max_steps"]
    assert listed == [JOB["max_steps"], step], "the preemption's checkpoint, then the final one"
    assert done.resumed_from_step == step
    assert done.attempt == 2
    assert job_row(stack, job.id).failures == 0
    assert [r.outcome for r in rows] == ["released", "succeeded"]
    assert f"Resumed from checkpoint-{step} on attempt 2" in [e.message for e in events]


def test_half_written_checkpoints_are_ignored_and_removed(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path) -> None:
    """What a worker killed while it committed a checkpoint leaves in storage: the folder of
    its next checkpoint with files uploaded (one cut short) and no manifest. The next attempt
    resumes from the last recorded checkpoint and deletes that folder; the API never lists
    it."""
    job = create_job(client, str(tiny_model), file_id, **JOB)
    wait_mid_training(stack, job.id)
    kill_pool_process(stack, job.id)

    store = stack.store()
    good = job_row(stack, job.id).last_good_step
    good_key = job_row(stack, job.id).last_good_checkpoint
    half = storage.checkpoint_key(job.id, 1, good + JOB["save_steps"])
    folders.delete_folder(store, half)  # in case it was committed just before the kill
    for key in store.list(good_key + "/"):
        name = key.removeprefix(good_key + "/")
        if name != storage.MANIFEST:
            store.put_bytes(f"{half}/{name}", b"\0" * 100 if name == "optimizer.pt"
                            else store.get_bytes(key))
    listed = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]

    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    events = [e for e in list_all_events(client, job.id)]
    removed = [e.data["removed"] for e in events if e.message.startswith("Removed checkpoint")]
    final = client.fine_tuning.jobs.checkpoints.list(job.id).data

    assert good + JOB["save_steps"] not in [s for s in listed if s > good]
    assert done.resumed_from_step == good
    assert removed == [[half]]
    assert store.list(half + "/") == []
    assert final and all(folders.exists(store, store.key_of(c.model_extra["path"]))
                         for c in final)


def test_cancel_while_waiting_to_be_requeued(stack: Stack, client: openai.OpenAI,
                                             file_id: str, tiny_model: Path) -> None:
    """A job whose worker process died waits out its retry backoff in ``queued``; cancelled then, it
    ends ``cancelled`` and no worker ever picks it up again."""
    job = create_job(client, str(tiny_model), file_id, **JOB)
    wait_until(lambda: progress_step(stack, job.id) >= 2, what="step 2")
    kill_pool_process(stack, job.id)

    waiting = wait_until(lambda: (r := job_row(stack, job.id)).status == "queued" and r,
                         what="the sweeper to re-queue the job", interval=0.02)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    # Past the backoff, the sweeper would have sent it and a worker claimed it by now.
    time.sleep(max(0.0, waiting.not_before - time.time()) + 3)
    rows = attempts(stack, job.id)

    assert waiting.attempt == 1 and waiting.not_before > time.time() - 3 - BACKOFF
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert [r.outcome for r in rows] == ["lost"]


def test_frozen_worker_is_replaced_and_fenced(stack: Stack, client: openai.OpenAI,
                                              file_id: str, tiny_model: Path) -> None:
    """A worker that goes silent (SIGSTOP: a hung node, a VM paused) misses its heartbeats; the
    job resumes elsewhere. When the frozen worker wakes up it finds its lease gone and stops
    without writing anything: no progress, metrics or checkpoints from the old attempt."""
    ensure_workers(stack, 2)  # the other one resumes the job
    job = create_job(client, str(tiny_model), file_id, **JOB)
    wait_mid_training(stack, job.id)
    index = freeze_owner(stack, job.id)
    try:
        wait_until(lambda: steps_logged_by(stack, job.id, 2) >= 1,
                   what="the job to train on the other worker")
    finally:
        stack.workers[index].signal_group(signal.SIGCONT)

    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    rows = assert_never_concurrent(stack, job.id)
    events = list_all_events(client, job.id)
    steps = list(train_losses(events, after_resume=True))
    ckpts = stack.sql("SELECT step_number, attempt FROM checkpoints WHERE job_id = :id",
                      id=job.id)

    assert done.attempt == 2
    assert [r.outcome for r in rows] == ["lost", "succeeded"]
    assert steps == list(range(done.resumed_from_step + 1, JOB["max_steps"] + 1))
    assert all(a == 2 for s, a in ckpts if s > done.resumed_from_step)
    assert stack.workers[index].alive(), "the frozen worker carries on, without the job"


def test_crash_loop_fails_the_job_and_spares_the_others(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path) -> None:
    """A job that kills its worker process on every attempt (an out-of-memory kill, say) fails
    after ``max_attempts`` with that reason; the pool process is replaced each time and another
    job trains meanwhile. Here the test kills the pool process each attempt runs in."""
    workers = ensure_workers(stack, 2)
    healthy = create_job(client, str(tiny_model), file_id, **JOB)
    doomed = create_job(client, str(tiny_model), file_id, **JOB)
    killed: list[int] = []

    def kill_new_attempt() -> bool:
        row = job_row(stack, doomed.id)
        if row.status == "running" and row.lease_owner and row.attempt not in killed:
            killed.append(row.attempt)
            os.kill(int(row.lease_owner.rsplit(":", 1)[1]), signal.SIGKILL)
        return row.status in ("failed", "succeeded", "cancelled")

    wait_until(kill_new_attempt, timeout=180, interval=0.02, what="the crash loop to end")
    failed = client.fine_tuning.jobs.retrieve(doomed.id)
    ok = wait_for_status(client, healthy.id, "succeeded", timeout=180)

    assert failed.status == "failed"
    assert failed.error.code == "worker_lost"
    assert "gave up after 3 attempts" in failed.error.message
    assert killed == [1, 2, 3]
    assert [r.outcome for r in assert_never_concurrent(stack, doomed.id)] == ["lost"] * 3
    assert ok.attempt == 1
    assert all(stack.workers[i].alive() for i in workers), "the worker processes survived"
