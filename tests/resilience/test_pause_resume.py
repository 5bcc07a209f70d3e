"""Pause and resume through the openai SDK, on a real worker: a paused job frees its worker,
and resumed, it ends with the same adapter as a twin that was never paused."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.resilience.conftest import (
    JOB,
    adapter_tensors,
    attempts,
    job_row,
    max_abs_diff,
    save_gate_env,
    start_stack,
    train_losses,
    wait_until,
)
from tests.support import Stack, create_job, list_all_events, upload_dialogsum, wait_for_status
from tests.support.preference import upload_preference

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("save-gate")


@pytest.fixture(scope="module")
def stack(make_module_stack: Any, tiny_model: Path, gate: Path) -> Stack:
    """One worker whose checkpoint saves a test can hold (``gate/hold-N``)."""
    return start_stack(make_module_stack, tiny_model, workers=1, env=save_gate_env(gate))


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


def heartbeat_at(stack: Stack, job_id: str) -> float:
    rows = stack.sql("SELECT heartbeat_at FROM jobs WHERE id = :id", id=job_id)
    return float(rows[0].heartbeat_at or 0.0)


@contextlib.contextmanager
def holding(gate: Path, step: int) -> Iterator[Path]:
    """Hold every save of checkpoint ``step`` until the block ends."""
    (gate / f"waiting-{step}").unlink(missing_ok=True)
    hold = gate / f"hold-{step}"
    hold.touch()
    try:
        yield gate / f"waiting-{step}"
    finally:
        hold.unlink()


def held(waiting: Path, job_id: str) -> None:
    """Wait until the worker is held in that save."""
    wait_until(waiting.exists, timeout=180, what=f"the worker of {job_id} held in a save")


def after_two_heartbeats(stack: Stack, job_id: str, since: float) -> None:
    """Two heartbeats of the worker after ``since`` (a time after the request was committed):
    the first read the job's flags after the request (it writes, then reads); by the second
    the worker has acted on what the first read."""
    wait_until(lambda: heartbeat_at(stack, job_id) > since, what="a heartbeat")
    first = heartbeat_at(stack, job_id)
    wait_until(lambda: heartbeat_at(stack, job_id) > first, what="another heartbeat")


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_pause_then_resume_gives_the_adapter_of_an_uninterrupted_twin(
        stack: Stack, client: openai.OpenAI, file_id: str, pairs_id: str, tiny_model: Path,
        gate: Path, method: str) -> None:
    data, options = file_id, dict(JOB)
    if method == "dpo":
        data, options["method"] = pairs_id, {"type": "dpo"}
    twin = create_job(client, str(tiny_model), data, **options)
    twin = wait_for_status(client, twin.id, "succeeded", timeout=300)

    with holding(gate, 4) as waiting:
        job = create_job(client, str(tiny_model), data, **options)
        held(waiting, job.id)
        requested = client.fine_tuning.jobs.pause(job.id)
        after_two_heartbeats(stack, job.id, time.time())
    paused = wait_for_status(client, job.id, "paused", timeout=180)
    row = job_row(stack, job.id)

    assert requested.status == "running"  # a running job pauses after its next checkpoint
    assert row.lease_owner is None and row.last_good_step == 5
    assert attempts(stack, job.id)[-1].outcome == "paused"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints][:1] == [5]
    assert paused.finished_at is None

    resumed = client.fine_tuning.jobs.resume(job.id)
    done = wait_for_status(client, job.id, "succeeded", timeout=300)

    assert resumed.status == "queued"
    assert done.attempt == 2 and done.resumed_from_step == 5
    losses = train_losses(list_all_events(client, job.id), after_resume=True)
    twin_losses = train_losses(list_all_events(client, twin.id))
    assert sorted(losses) == list(range(6, JOB["max_steps"] + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(twin_losses[step], abs=1e-6), f"train_loss at step {step}"
    assert max_abs_diff(adapter_tensors(done.adapter_path),
                        adapter_tensors(twin.adapter_path)) <= 1e-6
    messages = [e.message for e in list_all_events(client, job.id)]
    assert "Paused as requested; checkpoint saved at step 5; job paused" in messages
    assert "Job resumed; it continues from checkpoint-5" in messages


def test_a_paused_job_frees_its_worker_and_a_queued_job_pauses_at_once(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path,
        gate: Path) -> None:
    with holding(gate, 4) as at_4:
        first = create_job(client, str(tiny_model), file_id, **JOB)
        held(at_4, first.id)
        waiting = create_job(client, str(tiny_model), file_id, **JOB)  # the worker is busy
        waiting = wait_for_status(client, waiting.id, "queued")
        paused_at_once = client.fine_tuning.jobs.pause(waiting.id)
        client.fine_tuning.jobs.pause(first.id)
        after_two_heartbeats(stack, first.id, time.time())
    wait_for_status(client, first.id, "paused", timeout=180)
    third = create_job(client, str(tiny_model), file_id, **{**JOB, "max_steps": 2})

    assert paused_at_once.status == "paused"
    # The only worker is free again: a new job trains while the first stays paused.
    assert wait_for_status(client, third.id, "succeeded", timeout=300).attempt == 1
    assert client.fine_tuning.jobs.retrieve(first.id).status == "paused"
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "paused"

    cancelled = client.fine_tuning.jobs.cancel(first.id)
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"


def test_pause_and_resume_refuse_what_they_cannot_do(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path) -> None:
    http: httpx.Client = stack.http()
    done = wait_for_status(client, create_job(client, str(tiny_model), file_id,
                                              **{**JOB, "max_steps": 2}).id, "succeeded")

    for action in ("pause", "resume"):
        r = http.post(f"/v1/fine_tuning/jobs/{done.id}/{action}")
        error = r.json()["error"]
        assert r.status_code == 409, r.text
        assert error["param"] == "fine_tuning_job_id"
        assert "succeeded" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.pause("ftjob-doesnotexist")
    assert client.fine_tuning.jobs.retrieve(done.id).status == "succeeded"
