"""The official ``openai`` package against a live server: every call parses into its types."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import FileDeleted, FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.support import (
    Stack,
    create_job,
    dialogsum_records,
    jsonl_bytes,
    upload_bytes,
    upload_dialogsum,
    wait_for_status,
)

# Every test here talks to a live server whose worker trains the module's jobs.
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> FileObject:
    return upload_dialogsum(client, 32)


@pytest.fixture(scope="module")
def trained_job(client: openai.OpenAI, training_file: FileObject, tiny_model: Path) -> Any:
    """One job with lorafleet's extensions, trained to the end by the stack's worker."""
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=training_file.id,
        suffix="sdk",
        seed=7,
        metadata={"purpose": "sdk-test"},
        extra_body={"lora": {"r": 4, "alpha": 8}, "max_steps": 6, "save_steps": 3,
                    "logging_steps": 1, "max_length": 512, "batch_size": 4,
                    "prompt_format": "phi2-qa"},
    )
    return job, wait_for_status(client, job.id, "succeeded", timeout=180)


# --------------------------------------------------------------------------- files
def test_files_create_retrieve_list_content_delete(client: openai.OpenAI) -> None:
    content = jsonl_bytes(dialogsum_records(3))

    created = client.files.create(file=("three.jsonl", io.BytesIO(content)),
                                  purpose="fine-tune")
    retrieved = client.files.retrieve(created.id)
    listed = client.files.list()
    downloaded = client.files.content(created.id).read()
    deleted = client.files.delete(created.id)

    assert isinstance(created, FileObject)
    assert created.id.startswith("file-")
    assert (created.object, created.purpose, created.filename, created.bytes) == (
        "file", "fine-tune", "three.jsonl", len(content))
    assert created.status == "processed"
    assert created.line_count == 3  # extension fields stay reachable on the SDK object
    assert retrieved == created
    assert created.id in [f.id for f in listed.data]
    assert downloaded == content
    assert isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


# --------------------------------------------------------------------------- jobs
def test_create_returns_a_validating_job_with_the_extensions(
    trained_job: Any, training_file: FileObject, tiny_model: Path
) -> None:
    created, _ = trained_job

    assert isinstance(created, FineTuningJob)
    assert created.id.startswith("ftjob-")
    assert created.object == "fine_tuning.job"
    assert created.status == "validating_files"  # like OpenAI's: files are checked after
    assert created.model == str(tiny_model.resolve())
    assert created.training_file == training_file.id
    assert (created.seed, created.user_provided_suffix) == (7, "sdk")
    assert created.metadata == {"purpose": "sdk-test"}
    assert created.hyperparameters.batch_size == 4
    assert created.method is not None and created.method.type == "supervised"
    assert created.fine_tuned_model is None and created.finished_at is None
    assert created.lora["r"] == 4 and created.lora["alpha"] == 8
    assert (created.max_steps, created.max_length) == (6, 512)
    assert created.prompt_format["type"] == "phi2-qa"


def test_retrieve_a_finished_job(client: openai.OpenAI, trained_job: Any) -> None:
    created, _ = trained_job

    job = client.fine_tuning.jobs.retrieve(created.id)

    assert isinstance(job, FineTuningJob)
    assert job.status == "succeeded"
    assert job.error is None
    assert job.fine_tuned_model == f"ft:{Path(created.model).name}:sdk:{created.id}"
    assert job.finished_at is not None and job.finished_at >= job.created_at
    assert job.trained_tokens is not None and job.trained_tokens > 0
    assert job.progress["step"] == job.progress["total_steps"] == 6
    assert Path(job.adapter_path, "adapter_config.json").is_file()


def test_list_pages_with_after(stack: Stack, tiny_model: Path) -> None:
    # A project of its own, so that other tests' jobs do not show up in the pages.
    client = stack.openai(stack.create_key("pages"))
    file = upload_dialogsum(client, 4)
    ids = []
    for _ in range(3):
        job = create_job(client, str(tiny_model), file.id, max_steps=1000)
        client.fine_tuning.jobs.cancel(job.id)  # keep the worker free
        ids.append(job.id)
    newest_first = ids[::-1]

    first = client.fine_tuning.jobs.list(limit=1)
    second = client.fine_tuning.jobs.list(limit=1, after=first.data[0].id)
    last = client.fine_tuning.jobs.list(limit=2, after=second.data[0].id)
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=1)]

    assert all(isinstance(j, FineTuningJob) for j in first.data)
    assert [j.id for j in first.data] == newest_first[:1] and first.has_more is True
    assert [j.id for j in second.data] == newest_first[1:2] and second.has_more is True
    assert [j.id for j in last.data] == newest_first[2:] and last.has_more is False
    assert everything == newest_first


def test_list_events(client: openai.OpenAI, trained_job: Any) -> None:
    created, _ = trained_job

    page = client.fine_tuning.jobs.list_events(created.id, limit=2)
    events = list(client.fine_tuning.jobs.list_events(created.id, limit=100))

    assert len(page.data) == 2 and page.has_more is True
    assert all(isinstance(e, FineTuningJobEvent) for e in events)
    assert events[0].message.startswith("Fine-tuning job succeeded")  # newest first
    assert events[-1].message == f"Validating training file: {created.training_file}"
    assert "Files validated, moving job to queued state" in [e.message for e in events]
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert metrics and all(e.level == "info" for e in metrics)
    assert [e.id for e in events[:2]] == [e.id for e in page.data]


def test_checkpoints_list(client: openai.OpenAI, trained_job: Any) -> None:
    created, done = trained_job

    page = client.fine_tuning.jobs.checkpoints.list(created.id)

    assert page.data, "a job with save_steps=3 and max_steps=6 has checkpoints"
    assert all(isinstance(c, FineTuningJobCheckpoint) for c in page.data)
    steps = [c.step_number for c in page.data]
    assert steps == sorted(steps, reverse=True) and steps[0] == 6
    newest = page.data[0]
    assert newest.fine_tuning_job_id == created.id
    assert newest.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-6"
    assert newest.metrics.step == 6
    assert newest.metrics.train_loss is not None and newest.metrics.train_loss > 0
    assert Path(newest.path, "adapter_model.safetensors").is_file()


def test_cancel_returns_the_job(client: openai.OpenAI, training_file: FileObject,
                                tiny_model: Path) -> None:
    job = create_job(client, str(tiny_model), training_file.id, max_steps=1000)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    final = wait_for_status(client, job.id, "cancelled", timeout=60)

    assert isinstance(cancelled, FineTuningJob)
    assert cancelled.id == job.id
    assert cancelled.status in ("cancelled", "running")  # running: stops at its next step
    assert final.finished_at is not None


def test_upload_through_the_sdk_then_train_with_hyperparameters(
    client: openai.OpenAI, tiny_model: Path
) -> None:
    """OpenAI's own ``hyperparameters`` block is honoured too."""
    file = upload_bytes(client, jsonl_bytes(dialogsum_records(8)))

    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=file.id,
        hyperparameters={"batch_size": 2, "learning_rate_multiplier": 0.5, "n_epochs": 1},
        extra_body={"max_length": 512},
    )

    assert job.hyperparameters.batch_size == 2
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    assert job.learning_rate == pytest.approx(1e-4)
    assert job.n_epochs == 1
    client.fine_tuning.jobs.cancel(job.id)
