"""Continued training (what a job starts from), deleting fine-tuned models, and the job list's
metadata filter, through the API's routes in this process. Training itself, the SDK and a real
worker are in ``tests/e2e/test_continue_training.py``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared import storage
from shared.ids import fine_tuned_model_name, new_id, now
from shared.models import Checkpoint, Job
from shared.schemas import LoraSpec, TrainingSpec
from shared.storage import folders
from shared.templates import PromptFormat
from tests.support import dialogsum_records, jsonl_bytes
from tests.support.backends import require_postgres
from tests.support.stored import commit_files, folder_gone

BASE = "/models/tiny"
FORMAT = PromptFormat(type="dolly", instruction="Summarize the below conversation.")
LORA = LoraSpec(r=4, alpha=8, dropout=0.1)
TRAINED_ON = ["q_proj", "v_proj"]  # what the source adapter's adapter_config.json says


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]  # project p
    other: dict[str, str]  # project q
    training_file: str

    def create(self, model: str, **fields: Any) -> httpx.Response:
        return self.client.post("/v1/fine_tuning/jobs", headers=self.headers, json={
            "model": model, "training_file": self.training_file, "max_steps": 2, **fields})

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, job_id: str) -> list[str]:
        r = self.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100",
                            headers=self.headers)
        return [e["message"] for e in r.json()["data"]]

    def models(self) -> list[str]:
        return [m["id"] for m in self.client.get("/v1/models", headers=self.headers)
                .json()["data"]]

    def delete(self, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.delete(f"/v1/models/{model}", headers=headers or self.headers)


def session() -> Any:
    from shared.db import get_sessionmaker

    return get_sessionmaker()()


def job_count() -> int:
    with session() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def adapter_files(key: str) -> str:
    """An adapter's folder committed in storage, as a worker commits it."""
    return commit_files(key, {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": LORA.r,
                                           "lora_alpha": LORA.alpha,
                                           "target_modules": TRAINED_ON}),
        "adapter_model.safetensors": b"weights"})


def add_source(status: str = "succeeded", project: str = "p", *, files: bool = True,
               metadata: dict[str, str] | None = None, spec: dict[str, Any] | None = None
               ) -> Job:
    """A job as the worker leaves it: for ``succeeded``, its fine-tuned model and adapter."""
    job_id = new_id("ftjob")
    done = status == "succeeded"
    train_spec = TrainingSpec(model=BASE, training_file="file-x", lora=LORA, prompt_format=FORMAT,
                              max_length=512, max_steps=4, n_epochs=1, batch_size=1,
                              gradient_accumulation_steps=1, learning_rate=1e-4, warmup=0,
                              save_steps=2, logging_steps=1, train_on_inputs=False,
                              packing=False, seed=0, **(spec or {}))
    job = Job(id=job_id, project=project, created_at=now(), model=BASE, suffix="s",
              status=status, training_file="file-x", spec=train_spec.model_dump(mode="json"),
              seed=0, user_metadata=metadata,
              fine_tuned_model=fine_tuned_model_name(BASE, "s", job_id) if done else None,
              adapter_dir=storage.adapter_key(job_id, 1) if done else None)
    if done and files:
        adapter_files(storage.adapter_key(job_id, 1))
    with session() as s:
        s.add(job)
        s.commit()
        s.refresh(job)
        s.expunge(job)
    return job


def add_checkpoint(job: Job, step: int) -> str:
    """A saved checkpoint of ``job``; returns its model's name."""
    folder = adapter_files(storage.checkpoint_key(job.id, 1, step))
    with session() as s:
        s.add(Checkpoint(id=f"ftckpt-{job.id}-{step}", job_id=job.id, created_at=now(),
                         step_number=step, path=folder, metrics={},
                         attempt=1))
        s.commit()
    return f"{fine_tuned_model_name(BASE, 's', job.id)}:ckpt-step-{step}"


def error_of(r: httpx.Response, status: int, param: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Settings for a fresh database of each backend (dropped after the app stopped)."""
    if request.param == "sqlite":
        yield {}
        return
    from sqlalchemy import create_engine, text

    admin = require_postgres()
    name = f"lorafleet_models_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield {"database_url": admin.rsplit("/", 1)[0] + f"/{name}"}
    finally:
        from shared.db import get_engine

        get_engine().dispose()
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def api(database: dict[str, str], started_app: Callable[..., TestClient]) -> Api:
    """The API on each database backend, keys of projects p and q, and a file of p's."""
    from api.auth import create_key

    client = started_app(**database)
    with session() as s:
        _, key_p = create_key(s, "p")
        _, key_q = create_key(s, "q")
        s.commit()
    headers = {"Authorization": f"Bearer {key_p}"}
    up = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                     files={"file": ("d.jsonl", jsonl_bytes(dialogsum_records(4)))})
    assert up.status_code == 200, up.text
    return Api(client, headers, {"Authorization": f"Bearer {key_q}"}, up.json()["id"])


# --------------------------------------------------------------------------- continue training
def test_a_job_continues_from_a_fine_tuned_model_with_its_base_shape_and_format(
        api: Api) -> None:
    source = add_source()
    r = api.create(str(source.fine_tuned_model))
    assert r.status_code == 200, r.text
    job = r.json()

    assert job["model"] == BASE
    assert job["initial_model"] == source.fine_tuned_model
    assert job["lora"] == LORA.model_dump() and job["prompt_format"]["type"] == "dolly"
    assert job["prompt_format"]["instruction"] == FORMAT.instruction
    assert f"Continuing from {source.fine_tuned_model}" in api.events(job["id"])
    with session() as s:
        spec = s.scalar(select(Job.spec).where(Job.id == job["id"]))
    assert spec["initial_adapter"] == storage.adapter_key(source.id, 1)


def test_a_job_continues_from_a_checkpoint(api: Api) -> None:
    name = add_checkpoint(add_source("running"), 2)
    r = api.create(name)
    assert r.status_code == 200, r.text

    job = r.json()
    assert job["model"] == BASE and job["initial_model"] == name
    assert f"Continuing from {name} (checkpoint-2)" in api.events(job["id"])
    listed = {m["id"]: m for m in api.client.get("/v1/models", headers=api.headers)
              .json()["data"]}
    assert listed[name]["parent"] == BASE


@pytest.mark.parametrize("lora", [
    {"r": 4, "alpha": 8, "target_modules": ["v_proj", "q_proj"]},
    {"dropout": 0.0},
    {},
])
def test_the_request_may_repeat_the_lora_shape_and_set_dropout(api: Api,
                                                               lora: dict[str, Any]) -> None:
    source = add_source()
    r = api.create(str(source.fine_tuned_model), lora=lora, prompt_format="chat")
    assert r.status_code == 200, r.text

    got = r.json()
    assert (got["lora"]["r"], got["lora"]["alpha"]) == (LORA.r, LORA.alpha)
    assert got["lora"]["dropout"] == lora.get("dropout", LORA.dropout)
    assert got["prompt_format"]["type"] == "chat"  # named by the request: the request's


@pytest.mark.parametrize(("lora", "param"), [
    ({"r": 8}, "lora.r"),
    ({"r": 4, "alpha": 16}, "lora.alpha"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj"]}, "lora.target_modules"),
])
def test_a_changed_lora_shape_is_refused_naming_the_field(api: Api, lora: dict[str, Any],
                                                          param: str) -> None:
    source = add_source()
    before = job_count()

    error = error_of(api.create(str(source.fine_tuned_model), lora=lora), 400, param)
    assert str(source.fine_tuned_model) in error["message"]
    assert "LoRA shape" in error["message"]
    assert job_count() == before


def test_models_that_cannot_be_continued_from(api: Api) -> None:
    foreign = add_source(project="q")
    running = add_source("running")
    failed = add_source("failed")
    gone = add_source(files=False)
    ckpt_source = add_source()
    saved = add_checkpoint(ckpt_source, 2)
    before = job_count()

    not_found = [
        str(foreign.fine_tuned_model),  # another project's
        fine_tuned_model_name(BASE, "s", "ftjob-nosuchjob"),
        str(gone.fine_tuned_model),  # its adapter's files are not there
        saved.replace("ckpt-step-2", "ckpt-step-4"),  # never saved
        f"{fine_tuned_model_name(BASE, 's', foreign.id)}:ckpt-step-2",
    ]
    for model in not_found:
        assert error_of(api.create(model), 404, "model")["code"] == "model_not_found", model
    for job in (running, failed):
        name = fine_tuned_model_name(BASE, "s", job.id)
        assert error_of(api.create(name), 409, "model")["code"] == "model_not_ready"
    assert job_count() == before


# --------------------------------------------------------------------------- delete
def test_deleting_a_fine_tuned_model(api: Api) -> None:
    source = add_source()
    name = str(source.fine_tuned_model)
    checkpoint = add_checkpoint(source, 2)
    adapter = storage.adapter_key(source.id, 1)

    r = api.delete(name)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": name, "object": "model", "deleted": True}

    assert folder_gone(adapter)
    job = api.job(source.id)
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == name
    assert job["fine_tuned_model_deleted_at"] is not None and job["adapter_path"] is None
    assert f"Fine-tuned model deleted: {name}" in api.events(source.id)
    # Neither listed nor served; its checkpoint stays, a model of its own.
    assert name not in api.models() and checkpoint in api.models()
    error_of(api.client.get(f"/v1/models/{name}", headers=api.headers), 404, "model")
    error_of(api.client.post("/v1/completions", headers=api.headers,
                             json={"model": name, "prompt": "hi", "max_tokens": 1}),
             404, "model")
    error_of(api.create(name), 404, "model")
    assert api.create(checkpoint).status_code == 200
    # Twice: gone already.
    error_of(api.delete(name), 404, "model")


def test_deleting_a_checkpoint_model(api: Api) -> None:
    source = add_source()
    checkpoint = add_checkpoint(source, 2)

    r = api.delete(checkpoint)
    assert r.status_code == 200 and r.json()["deleted"] is True

    assert folder_gone(storage.checkpoint_key(source.id, 1, 2))
    assert checkpoint not in api.models() and source.fine_tuned_model in api.models()
    listed = api.client.get(f"/v1/fine_tuning/jobs/{source.id}/checkpoints",
                            headers=api.headers).json()["data"]
    assert listed == []
    error_of(api.delete(checkpoint), 404, "model")


def test_what_cannot_be_deleted_stays(api: Api) -> None:
    foreign = add_source(project="q")
    running = add_source("running")
    running_checkpoint = add_checkpoint(running, 2)
    used = add_source()
    continued = api.create(str(used.fine_tuned_model))
    assert continued.status_code == 200  # an unfinished job that continues from ``used``

    # Another project's model answers as one that never existed, byte for byte.
    theirs = str(foreign.fine_tuned_model)
    nobodys = fine_tuned_model_name(BASE, "s", "ftjob-" + "0" * 24)
    error_of(api.delete(theirs), 404, "model")
    assert (api.delete(theirs).text.replace(theirs, "<id>")
            == api.delete(nobodys).text.replace(nobodys, "<id>"))
    error_of(api.delete(str(used.fine_tuned_model), headers=api.other), 404, "model")
    error_of(api.delete(BASE), 400, "model")
    error_of(api.delete("gpt-4o"), 404, "model")
    error_of(api.delete(fine_tuned_model_name(BASE, "s", running.id)), 409, "model")
    assert running.id in error_of(api.delete(running_checkpoint), 409, "model")["message"]
    assert continued.json()["id"] in error_of(api.delete(str(used.fine_tuned_model)), 409,
                                              "model")["message"]

    store = storage.get_store()
    assert all(folders.exists(store, key) for key in (
        storage.adapter_key(used.id, 1), storage.adapter_key(foreign.id, 1),
        storage.checkpoint_key(running.id, 1, 2)))
    assert {str(used.fine_tuned_model), running_checkpoint} <= set(api.models())
    assert api.job(used.id)["fine_tuned_model_deleted_at"] is None

    # Once the continued job has ended, the model can go.
    api.client.post(f"/v1/fine_tuning/jobs/{continued.json()['id']}/cancel",
                    headers=api.headers)
    assert api.delete(str(used.fine_tuned_model)).status_code == 200


# --------------------------------------------------------------------------- metadata filter
def test_the_job_list_filters_by_metadata(database: dict[str, str],
                                          started_app: Callable[..., TestClient]) -> None:
    from api.auth import create_key

    client = started_app(**database)
    with session() as s:
        headers = {"Authorization": f"Bearer {create_key(s, 'p')[1]}"}
        s.commit()
    odd = 'we"ird.key[0]'
    jobs = [add_source(metadata=m) for m in (
        {"team": "a", "run": "1"}, None, {"team": "b"}, {"team": "a", "run": "2"},
        {odd: "v'x", "team": ""}, {}, {"$.team": "a"})]
    add_source(project="q", metadata={"team": "a"})
    ids = [j.id for j in jobs]

    def listed(query: str, limit: int = 100) -> list[str]:
        found: list[str] = []
        after = ""
        while True:  # page through: the filter applies before each page is cut
            r = client.get(f"/v1/fine_tuning/jobs?limit={limit}{after}&{query}", headers=headers)
            assert r.status_code == 200, r.text
            found += [j["id"] for j in r.json()["data"]]
            if not r.json()["has_more"]:
                return found
            after = f"&after={found[-1]}"

    newest_first = ids[::-1]
    team_a = [ids[3], ids[0]]
    assert listed("metadata[team]=a") == team_a
    assert listed("metadata[team]=a", limit=1) == team_a
    assert listed("metadata[team]=a&metadata[run]=2") == [ids[3]]
    assert listed("metadata[team]=") == [ids[4]]
    assert listed(httpx.QueryParams({f"metadata[{odd}]": "v'x"}).__str__()) == [ids[4]]
    assert listed("metadata[%24.team]=a") == [ids[6]]
    assert listed("metadata[team]=c") == []
    assert listed("metadata=null") == [ids[1]]
    assert listed("") == newest_first

    for bad in ("metadata=x", "metadata=null&metadata[team]=a", "metadata[team]=a%00"):
        r = client.get(f"/v1/fine_tuning/jobs?{bad}", headers=headers)
        error_of(r, 400, "metadata")
