"""A job from upload to a loadable adapter, on a real Celery worker, on both backends."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.storage import MANIFEST
from tests.support import (
    BACKENDS,
    Stack,
    create_job,
    list_all_events,
    upload_dialogsum,
)

pytestmark = pytest.mark.e2e

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, make_module_stack: Any) -> Stack:
    """One stack per backend: embedded (SQLite + filesystem broker) and Redis + PostgreSQL."""
    return make_module_stack(backend=request.param)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.openai()


def watch(client: openai.OpenAI, job_id: str, timeout: float = 180) -> tuple[list[str], list[int]]:
    """Poll a job until it ends; returns the statuses seen (in order, without repeats) and
    the progress steps seen while it was running."""
    statuses: list[str] = []
    steps: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not statuses or statuses[-1] != job.status:
            statuses.append(job.status)
        if job.status == "running" and job.progress:
            steps.append(job.progress["step"])
        if job.status in ("succeeded", "failed", "cancelled"):
            return statuses, steps
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout}s; seen {statuses}")


@pytest.fixture(scope="module")
def finished(client: openai.OpenAI, tiny_model: Path) -> dict[str, Any]:
    """An 8-step job on 64 DialogSum records with a validation file, watched from creation
    to the end."""
    train = upload_dialogsum(client, 64)
    valid = upload_dialogsum(client, 8, split="validation")
    created = create_job(client, str(tiny_model), train.id, validation_file=valid.id,
                         max_steps=8, save_steps=4, max_length=512, suffix="e2e")
    statuses, steps = watch(client, created.id)
    return {"created": created, "statuses": statuses, "steps": steps,
            "job": client.fine_tuning.jobs.retrieve(created.id), "valid": valid}


def test_status_goes_validating_queued_running_succeeded(finished: dict[str, Any]) -> None:
    # What creation answered, then what polling saw (a short "queued" may fall between polls).
    seen = [finished["created"].status, *finished["statuses"]]
    path = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]

    assert finished["created"].status == "validating_files"
    assert path in (["validating_files", "queued", "running", "succeeded"],
                    ["validating_files", "running", "succeeded"]), finished["job"].error


def test_progress_advances_while_running(finished: dict[str, Any]) -> None:
    steps = finished["steps"]

    assert steps == sorted(steps), "progress never goes backwards"
    assert len(set(steps)) >= 2, f"saw only steps {sorted(set(steps))} while running"
    job = finished["job"]
    assert job.progress["step"] == job.progress["total_steps"] == 8
    assert job.progress["loss"] is not None and math.isfinite(job.progress["loss"])


def test_job_reports_parameters_and_dataset(finished: dict[str, Any]) -> None:
    job = finished["job"]

    assert 0 < job.trainable_parameters < job.total_parameters
    assert job.dataset["examples"] > 0
    assert job.dataset["examples"] + job.dataset["dropped_too_long"] == 64
    assert job.trained_tokens > 0
    assert job.attempt == 1


def test_checkpoints_are_listed(stack: Stack, client: openai.OpenAI,
                                finished: dict[str, Any]) -> None:
    job = finished["job"]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data

    assert [c.step_number for c in checkpoints] == [8, 4]
    for ckpt in checkpoints:
        # Committed in the stack's storage: its manifest lists every file it holds.
        store = stack.store()
        manifest = json.loads(store.get_bytes(f"{store.key_of(ckpt.path)}/{MANIFEST}"))
        assert {"adapter_model.safetensors", "optimizer.pt"} <= set(manifest["files"])
        assert ckpt.metrics.train_loss is not None
    assert job.last_good_checkpoint_step == 8


def test_adapter_loads_with_peft_and_was_trained(stack: Stack, finished: dict[str, Any],
                                                 tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = finished["job"]
    assert job.id in job.adapter_path
    assert job.adapter_path.startswith("s3://" if stack.storage == "s3" else "/")
    adapter = stack.local_folder(job.adapter_path)

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        tuned_logits = model(ids).logits

    # peft initialises B to zero; training moved every B matrix away from it.
    assert lora_b, "the adapter has LoRA weights"
    assert all(p.abs().max().item() > 0 for p in lora_b.values())
    assert not torch.allclose(base_logits, tuned_logits)
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}


def test_adapter_records_its_prompt_format(stack: Stack, finished: dict[str, Any],
                                          tiny_model: Path) -> None:
    job = finished["job"]

    meta = json.loads((stack.local_folder(job.adapter_path) / "lorafleet.json").read_text())

    assert meta["prompt_format"] == job.prompt_format
    assert meta["prompt_format"]["type"] == "dolly"
    assert meta["prompt_format"]["instruction"] == "Summarize the below conversation."
    assert meta["base_model"] == str(tiny_model.resolve())
    assert (meta["job_id"], meta["fine_tuned_model"]) == (job.id, job.fine_tuned_model)
    assert meta["max_length"] == 512


def test_events_tell_the_story(client: openai.OpenAI, finished: dict[str, Any]) -> None:
    messages = [e.message for e in list_all_events(client, finished["job"].id)]

    assert messages[0].startswith("Validating training file: ")
    assert "Files validated, moving job to queued state" in messages
    assert any(m.startswith("Attempt 1 started on") for m in messages)
    assert any(m.startswith("Training started: ") for m in messages)
    assert any(m == "Checkpoint saved at step 4" for m in messages)
    assert messages[-1].startswith("Fine-tuning job succeeded")


def test_validation_loss_is_reported(client: openai.OpenAI, finished: dict[str, Any]) -> None:
    job = finished["job"]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    events = list_all_events(client, job.id)

    assert job.validation_file == finished["valid"].id
    assert 0 < job.dataset["validation_examples"] <= 8
    assert checkpoints and all(math.isfinite(c.metrics.valid_loss) for c in checkpoints)
    valid_events = [e for e in events if e.type == "metrics" and "valid_loss" in (e.data or {})]
    assert {e.data["step"] for e in valid_events} >= {4, 8}
    assert any(e.message.startswith("Step 4: valid_loss=") for e in valid_events)
    assert all(e.data["valid_loss"] > 0 for e in valid_events)
