"""A job's checkpoints are models: ``ft:<base>:<suffix>:<job id>:ckpt-step-N`` (the name
``/checkpoints`` lists) is listed by ``/v1/models`` and answers completions and chat with the
checkpoint's adapter in the job's prompt format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy.orm import Session

from api.served_models import checkpoint_model_name, get_model, list_models, resolve_model
from shared import storage
from shared.errors import NotFound
from shared.ids import now
from shared.models import Checkpoint, Job
from shared.templates import PromptFormat, render_prompt
from tests.engine import test_model_resolution as resolution
from tests.engine.conftest import ServingStack
from tests.engine.test_model_resolution import BASE, FORMAT, add_job
from tests.support import create_job, dialogsum_records, jsonl_bytes, upload_bytes, wait_for_status
from tests.support.stored import commit_files

# Steps 2, 4 and 6 are saved; once the job succeeds, retention keeps the newest two.
SERVING_SETTINGS = {"keep_checkpoints": 2}
TRAINING = {"max_steps": 6, "save_steps": 2, "learning_rate": 5e-2, "batch_size": 4,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "seed": 3}
STORY = "Once upon a time"
# Prompts the job never trained on, tried in turn until the checkpoint and the final adapter
# write different text on one (which one depends on the records the job trained on).
STORIES = (STORY, "The weather was", "Dear Sir, I write to", "#Person1#: Where were you",
           "In the morning the", "She said that the", "1, 2, 3,", "Why")
DIALOGUE = "#Person1#: Hello, are you coming to the party tonight?\n#Person2#: Yes, I am."


# --------------------------------------------------------------------------- resolution
db = resolution.db  # a migrated database in a fresh storage folder


def add_checkpoint(session: Session, job: Job, step: int, *, deleted: bool = False,
                   files: bool = True) -> str:
    """A checkpoint row of ``job`` and, with ``files``, its folder committed in storage with
    the adapter's files; returns the folder's URL."""
    key = storage.checkpoint_key(job.id, 1, step)
    if files:
        commit_files(key, {"adapter_config.json": "{}", "adapter_model.safetensors": b""})
    session.add(Checkpoint(id=f"ftckpt-{job.id}-{step}", job_id=job.id, created_at=now(),
                           step_number=step, path=key, metrics={}, attempt=1,
                           deleted=deleted))
    session.commit()
    return storage.get_store().url(key)


def name_of(job: Job, step: int) -> str:
    return checkpoint_model_name(job.model, job.suffix, job.id, step)


@pytest.mark.parametrize("status", ["succeeded", "running"])
def test_a_checkpoint_resolves_to_its_folder_in_the_job_format(db: Any, status: str) -> None:
    with db() as s:
        job = add_job(s, status)
        folder = add_checkpoint(s, job, 4)
        target = resolve_model(s, "p", name_of(job, 4))
    assert target.model == name_of(job, 4) and target.base_model == BASE
    assert target.adapter_path == folder and target.prompt_format == FORMAT


def test_checkpoints_are_listed_after_the_fine_tuned_models(db: Any) -> None:
    with db() as s:
        job = add_job(s, "succeeded")
        running = add_job(s, "running")
        for step in (2, 4):
            add_checkpoint(s, job, step)
        add_checkpoint(s, job, 6, deleted=True)
        add_checkpoint(s, running, 2)
        add_checkpoint(s, add_job(s, "succeeded", project="q"), 2)
        listed = list_models(s, "p").data
        one = get_model(s, "p", name_of(job, 4))
    assert [(m.id, m.parent, m.root) for m in listed] == [
        (BASE, None, BASE), (job.fine_tuned_model, BASE, BASE),
        (name_of(job, 2), BASE, BASE), (name_of(job, 4), BASE, BASE),
        (name_of(running, 2), BASE, BASE)]
    assert {m.owned_by for m in listed[1:]} == {"org-p"}
    assert one.id == name_of(job, 4)


def test_unknown_foreign_and_deleted_checkpoints_are_not_found(db: Any) -> None:
    with db() as s:
        job = add_job(s, "succeeded")
        add_checkpoint(s, job, 2, deleted=True)  # deleted by retention
        add_checkpoint(s, job, 4, files=False)  # its folder is gone
        add_checkpoint(s, job, 6)
        foreign = add_job(s, "succeeded", project="q")
        add_checkpoint(s, foreign, 6)
        names = [name_of(job, 2), name_of(job, 4), name_of(job, 8), name_of(foreign, 6),
                 name_of(job, 6).replace(":s:", ":other:"),  # the job's name, not another
                 f"{job.fine_tuned_model}:ckpt-step-06", f"{job.fine_tuned_model}:ckpt-step-0",
                 f"{job.fine_tuned_model}:ckpt-step-99999999999999999999",
                 "ft:tiny:s:ftjob-nope:ckpt-step-6"]
        for name in names:
            with pytest.raises(NotFound) as caught:
                resolve_model(s, "p", name)
            assert caught.value.status == 404 and caught.value.code == "model_not_found", name
        resolve_model(s, "p", name_of(job, 6))  # and the one that is there resolves


# --------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai()


@pytest.fixture(scope="module")
def job(client: openai.OpenAI, tiny_model: Path) -> Any:
    file = upload_bytes(client, jsonl_bytes(dialogsum_records(8)), "dialogsum-8.jsonl")
    created = create_job(client, str(tiny_model), file.id, suffix="ck", **TRAINING)
    return wait_for_status(client, created.id, "succeeded", timeout=300)


@pytest.fixture(scope="module")
def checkpoints(client: openai.OpenAI, job: Any) -> dict[int, Any]:
    """The job's checkpoints that retention kept, by step."""
    return {c.step_number: c for c in client.fine_tuning.jobs.checkpoints.list(job.id)}


@pytest.mark.e2e
def test_checkpoint_models_are_listed(serving: ServingStack, client: openai.OpenAI, job: Any,
                                      checkpoints: dict[int, Any]) -> None:
    assert sorted(checkpoints) == [4, 6]
    models = {m.id: m for m in client.models.list()}
    for checkpoint in checkpoints.values():
        model = models[checkpoint.fine_tuned_model_checkpoint]
        assert model.owned_by == "org-test"
        assert (model.parent, model.root) == (job.model, job.model)
        retrieved = client.models.retrieve(checkpoint.fine_tuned_model_checkpoint)
        assert retrieved.id == model.id
    deleted = checkpoints[4].fine_tuned_model_checkpoint.replace("step-4", "step-2")
    assert deleted not in models
    # Another project sees none of them and cannot use them.
    other = serving.stack.openai(key=serving.stack.create_key("other"))
    assert checkpoints[4].fine_tuned_model_checkpoint not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=checkpoints[4].fine_tuned_model_checkpoint,
                                 prompt="hi", max_tokens=4)


@pytest.mark.e2e
def test_unknown_and_deleted_checkpoints_are_not_found(client: openai.OpenAI,
                                                       checkpoints: dict[int, Any]) -> None:
    name = checkpoints[4].fine_tuned_model_checkpoint
    for missing in (name.replace("step-4", "step-2"), name.replace("step-4", "step-5")):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=missing, prompt="hi", max_tokens=4)
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=missing, max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])


@pytest.mark.e2e
def test_a_checkpoint_generates_what_peft_generates_with_its_folder(
    client: openai.OpenAI, job: Any, checkpoints: dict[int, Any], tiny_tokenizer: Any,
    reference: Any,
) -> None:
    checkpoint = checkpoints[4]
    name = checkpoint.fine_tuned_model_checkpoint
    folder = Path(checkpoint.model_extra["path"])

    def tokens(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(ids: list[int]) -> str:
        return tiny_tokenizer.decode(ids, skip_special_tokens=True)

    # A prompt the job never trained on: the text runs on, sensitive to every weight. It must
    # be one on which the final adapter writes otherwise, or serving the final adapter in the
    # checkpoint's place would pass unseen.
    final = Path(job.model_extra["adapter_path"])

    def told_apart(text: str) -> list[int] | None:
        """The checkpoint's tokens for ``text``, if the final adapter's differ."""
        ids = reference(folder, tokens(text), 24)
        return ids if ids != reference(final, tokens(text), 24) else None

    found = next(((t, ids) for t in STORIES if (ids := told_apart(t)) is not None), None)
    assert found, ("the final adapter writes the same on every prompt: the comparison could "
                   "not tell them apart")
    story_prompt, expected = found
    story = client.completions.create(model=name, prompt=story_prompt, max_tokens=24,
                                      temperature=0, extra_body={"raw_prompt": True})
    assert story.model == name
    assert story.choices[0].text == decode(expected)
    assert story.usage.completion_tokens == len(expected)

    # Without raw_prompt the server wraps the dialogue in the job's prompt format (and may
    # stop earlier, at the format's end marker); chat does the same with the user message.
    fmt = PromptFormat.model_validate(job.model_extra["prompt_format"])
    prompt = render_prompt(fmt, DIALOGUE)
    raw = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"raw_prompt": True})
    assert raw.choices[0].text == decode(reference(folder, tokens(prompt), 12))
    wrapped = client.completions.create(model=name, prompt=DIALOGUE, max_tokens=12,
                                        temperature=0)
    assert raw.choices[0].text.startswith(wrapped.choices[0].text)
    assert wrapped.usage.prompt_tokens == len(tokens(prompt))
    chat = client.chat.completions.create(model=name, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": DIALOGUE}])
    assert chat.choices[0].message.content == wrapped.choices[0].text
