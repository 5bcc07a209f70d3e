"""Continued training, model deletion and the metadata filter through the openai SDK, on a
real API and Celery worker, on both backends (the adapter a job continues from comes from a
folder or from S3): a job started from a fine-tuned model (or a checkpoint) trains those very
weights further."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import BACKENDS, Stack, list_all_events, upload_dialogsum, wait_for_status

pytestmark = pytest.mark.e2e

torch = pytest.importorskip("torch")

SOURCE = {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "learning_rate": 3e-3,
          "batch_size": 4, "max_length": 512, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# Adam's steps are about the learning rate in size: at 1e-12 they vanish in float32 rounding
# next to weights of 1e-4 and more, so the weights a job starts from are the ones it ends with.
STILL = {"learning_rate": 1e-12, "logging_steps": 1, "batch_size": 4, "max_length": 512}
SEED = 7


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, make_module_stack: Any) -> Stack:
    """One stack per backend: embedded on a folder, Redis + PostgreSQL on S3."""
    return make_module_stack(backend=request.param)


def weights(stack: Stack, url: str) -> dict[str, Any]:
    """The weights of the adapter folder at ``url`` (a storage URL)."""
    from safetensors.torch import load_file

    return load_file(stack.local_folder(url) / "adapter_model.safetensors")


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9)
                                        for k in a)


def train_losses(client: openai.OpenAI, job_id: str) -> list[float]:
    """The job's training loss at each step, in step order."""
    by_step = {e.data["step"]: e.data["train_loss"] for e in list_all_events(client, job_id)
               if e.type == "metrics" and (e.data or {}).get("train_loss") is not None}
    return [by_step[step] for step in sorted(by_step)]


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 32).id


@pytest.fixture(scope="module")
def source(client: openai.OpenAI, tiny_model: Path, training_file: str) -> Any:
    """A finished 6-step job (checkpoints at steps 3 and 6)."""
    job = client.fine_tuning.jobs.create(model=str(tiny_model), training_file=training_file,
                                         suffix="source", seed=SEED,
                                         metadata={"stage": "source"}, extra_body=SOURCE)
    return wait_for_status(client, job.id, "succeeded", timeout=300)


@pytest.fixture(scope="module")
def continued(client: openai.OpenAI, source: Any, training_file: str) -> tuple[Any, Any]:
    """Two steps from the source's fine-tuned model, with no ``lora``: the source's is taken.
    Returns the job as created and as finished."""
    created = client.fine_tuning.jobs.create(
        model=source.fine_tuned_model, training_file=training_file, suffix="more", seed=SEED,
        metadata={"stage": "continued"}, extra_body={**STILL, "max_steps": 2})
    return created, wait_for_status(client, created.id, "succeeded", timeout=300)


def test_a_continued_job_reports_its_base_model_and_where_it_started(
        client: openai.OpenAI, source: Any, continued: tuple[Any, Any]) -> None:
    created, done = continued

    assert created.model == source.model == done.model  # the base model
    assert done.model_extra["initial_model"] == source.fine_tuned_model
    assert done.model_extra["lora"] == source.model_extra["lora"]
    assert done.fine_tuned_model.endswith(f":more:{done.id}")
    messages = [e.message for e in list_all_events(client, done.id)]
    assert f"Continuing from {source.fine_tuned_model}" in messages
    parents = {m.id: m.model_extra["parent"] for m in client.models.list()}
    assert parents[done.fine_tuned_model] == source.fine_tuned_model


def test_a_continued_job_starts_from_the_source_weights(stack: Stack, client: openai.OpenAI,
                                                       source: Any,
                                                       continued: tuple[Any, Any]) -> None:
    _, done = continued
    start, end = weights(stack, source.model_extra["adapter_path"]), weights(
        stack, done.model_extra["adapter_path"])

    # A fresh adapter starts with every B at zero; the source's are trained away from it.
    assert max(float(w.abs().max()) for k, w in start.items() if "lora_B" in k) > 1e-3
    assert same_weights(end, start)
    # Same seed and data: both jobs' first step sees the same batch. The continued job meets
    # it with the trained weights, so its loss is where the source's training got to.
    source_losses, continued_losses = train_losses(client, source.id), train_losses(client,
                                                                                   done.id)
    assert len(source_losses) == 6 and len(continued_losses) == 2
    assert continued_losses[0] < source_losses[0]
    assert abs(continued_losses[0] - min(source_losses)) < source_losses[0] - continued_losses[0]


def test_a_job_continues_from_a_checkpoint(stack: Stack, client: openai.OpenAI, source: Any,
                                           training_file: str) -> None:
    step3 = next(c for c in client.fine_tuning.jobs.checkpoints.list(source.id)
                 if c.step_number == 3)

    job = client.fine_tuning.jobs.create(
        model=step3.fine_tuned_model_checkpoint, training_file=training_file, seed=SEED,
        extra_body={**STILL, "max_steps": 1})
    done = wait_for_status(client, job.id, "succeeded", timeout=300)

    assert done.model == source.model
    assert done.model_extra["initial_model"] == step3.fine_tuned_model_checkpoint
    assert (f"Continuing from {step3.fine_tuned_model_checkpoint} (checkpoint-3)"
            in [e.message for e in list_all_events(client, done.id)])
    end = weights(stack, done.model_extra["adapter_path"])
    assert same_weights(end, weights(stack, step3.model_extra["path"]))
    assert not same_weights(end, weights(stack, source.model_extra["adapter_path"]))


def test_bad_continuations_are_refused_and_create_nothing(
        client: openai.OpenAI, source: Any, training_file: str, stack: Any) -> None:
    before = len(list(client.fine_tuning.jobs.list(limit=100)))

    with pytest.raises(openai.BadRequestError) as shape:
        client.fine_tuning.jobs.create(model=source.fine_tuned_model,
                                       training_file=training_file,
                                       extra_body={**STILL, "lora": {"r": 8}})
    assert shape.value.param == "lora.r" and "was trained with 4" in shape.value.message
    other = stack.openai(stack.create_key("another-project"))
    other_file = upload_dialogsum(other, 8).id
    with pytest.raises(openai.NotFoundError) as foreign:
        other.fine_tuning.jobs.create(model=source.fine_tuned_model, training_file=other_file,
                                      extra_body=STILL)
    assert foreign.value.param == "model" and foreign.value.code == "model_not_found"

    assert len(list(client.fine_tuning.jobs.list(limit=100))) == before
    assert list(other.fine_tuning.jobs.list()) == []


def test_the_job_list_filters_by_metadata(client: openai.OpenAI, source: Any,
                                          continued: tuple[Any, Any]) -> None:
    _, done = continued

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"stage": "continued"})] == [
        done.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"stage": "source"})] == [
        source.id]
    assert list(client.fine_tuning.jobs.list(metadata={"stage": "none"})) == []


def test_deleting_a_fine_tuned_model(client: openai.OpenAI, stack: Any,
                                     continued: tuple[Any, Any]) -> None:
    _, done = continued
    name = done.fine_tuned_model
    store = stack.store()
    adapter = store.key_of(done.model_extra["adapter_path"])
    assert store.list(adapter + "/")

    deleted = client.models.delete(name)

    assert (deleted.id, deleted.object, deleted.deleted) == (name, "model", True)
    assert store.list(adapter + "/") == []  # no object of it left
    job = client.fine_tuning.jobs.retrieve(done.id)
    assert job.status == "succeeded" and job.fine_tuned_model == name
    assert job.model_extra["fine_tuned_model_deleted_at"] is not None
    assert name not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="Hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    other = stack.openai(stack.keys.get("another-project") or stack.create_key("another-project"))
    source_name = client.models.retrieve(job.model_extra["initial_model"]).id
    with pytest.raises(openai.NotFoundError):
        other.models.delete(source_name)
    assert source_name in [m.id for m in client.models.list()]
