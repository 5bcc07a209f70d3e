"""Which model names a project may use, what they resolve to, and the API routes' behaviour
that needs no engine (model lists, errors, an engine that is down)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from api.served_models import list_models, resolve_model
from shared import storage
from shared.errors import ModelNotReady, NotFound
from shared.ids import fine_tuned_model_name, new_id, now
from shared.models import Job
from shared.schemas import LoraSpec, TrainingSpec
from shared.templates import PromptFormat

BASE = "/models/tiny"
FORMAT = PromptFormat(type="dolly", instruction="Summarize the below conversation.")


@pytest.fixture
def db(settings_env: Callable[..., Any]) -> Any:
    """A migrated database in a fresh storage folder; yields a session factory."""
    from shared.db import get_sessionmaker
    from shared.migrate import upgrade

    settings_env(engine_url="http://127.0.0.1:9")  # nothing listens on the discard port
    upgrade()
    return get_sessionmaker()


def add_job(session: Session, status: str, project: str = "p", suffix: str | None = "s",
            model: str = BASE) -> Job:
    spec = TrainingSpec(model=model, training_file="file-x", lora=LoraSpec(),
                        prompt_format=FORMAT, max_length=512, max_steps=1, n_epochs=1,
                        batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4,
                        warmup=0, save_steps=1, logging_steps=1, train_on_inputs=False,
                        packing=False, seed=0)
    job_id = new_id("ftjob")
    done = status == "succeeded"
    job = Job(id=job_id, project=project, created_at=now(), model=model, suffix=suffix,
              status=status, training_file="file-x", spec=spec.model_dump(mode="json"), seed=0,
              fine_tuned_model=fine_tuned_model_name(model, suffix, job_id) if done else None,
              adapter_dir=storage.adapter_key(job_id, 1) if done else None)
    session.add(job)
    session.commit()
    return job


def test_models_of_the_project_succeeded_jobs(db: Any) -> None:
    with db() as s:
        ok = add_job(s, "succeeded")
        add_job(s, "running")
        add_job(s, "failed")
        other = add_job(s, "succeeded", project="q", model="/models/other")
        listed = list_models(s, "p")
    assert [(m.id, m.parent) for m in listed.data] == [(BASE, None),
                                                      (ok.fine_tuned_model, BASE)]
    assert other.fine_tuned_model not in [m.id for m in listed.data]


def test_resolving_a_fine_tuned_and_a_base_model(db: Any) -> None:
    with db() as s:
        job = add_job(s, "succeeded")
        target = resolve_model(s, "p", job.fine_tuned_model)
        base = resolve_model(s, "p", BASE)
    assert target.base_model == BASE and target.prompt_format == FORMAT
    assert target.adapter_path == str(storage.get_store().local_path(
        storage.adapter_key(job.id, 1)))
    assert target.model == job.fine_tuned_model
    assert base.adapter_path is None and base.base_model == BASE


@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_job_that_has_not_succeeded_is_a_conflict(db: Any, status: str) -> None:
    with db() as s:
        job = add_job(s, status)
        name = fine_tuned_model_name(BASE, "s", job.id)
        with pytest.raises(ModelNotReady) as caught:
            resolve_model(s, "p", name)
        assert caught.value.status == 409 and status in caught.value.message
        # Only the job's own name: another suffix is an unknown model.
        with pytest.raises(NotFound):
            resolve_model(s, "p", fine_tuned_model_name(BASE, "other", job.id))


def test_unknown_and_foreign_models_are_not_found(db: Any) -> None:
    with db() as s:
        foreign = add_job(s, "succeeded", project="q")
        for name in ("gpt-4o", "ft:tiny:s:ftjob-nope", foreign.fine_tuned_model,
                     "/models/never-trained"):
            with pytest.raises(NotFound) as caught:
                resolve_model(s, "p", name)
            assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_resolving_gives_the_database_connection_back(db: Any) -> None:
    """A request may wait for the engine for minutes: it must not hold a pooled connection
    meanwhile, or enough waiting requests starve every other route."""
    from api.model_cache import _resolve
    from shared.db import get_engine

    with db() as s:
        job = add_job(s, "succeeded")
    target = _resolve("p", job.fine_tuned_model)
    assert target.model == job.fine_tuned_model and target.adapter_path
    assert get_engine().pool.checkedout() == 0


def test_routes_without_an_engine(db: Any) -> None:
    """Listing needs no engine; a completion answers 503 in OpenAI's error shape when the
    engine is down, and unknown or unready models are refused before the engine is asked."""
    from fastapi.testclient import TestClient

    from api.auth import create_key
    from api.main import create_app

    with db() as s:
        job = add_job(s, "succeeded")
        queued = add_job(s, "queued")
        _, key = create_key(s, "p")
        s.commit()
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app()) as client:
        models = client.get("/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == [BASE, job.fine_tuned_model]
        one = client.get(f"/v1/models/{job.fine_tuned_model}", headers=headers)
        assert one.status_code == 200 and one.json()["owned_by"] == "org-p"

        def complete(model: str) -> Any:
            return client.post("/v1/completions", headers=headers,
                               json={"model": model, "prompt": "hi", "max_tokens": 2})

        down = complete(job.fine_tuned_model)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "engine_unavailable"
        assert complete("nope").status_code == 404
        not_ready = complete(fine_tuned_model_name(BASE, "s", queued.id))
        assert not_ready.status_code == 409
        assert not_ready.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/v1/completions", json={"model": BASE, "prompt": "x"}
                           ).status_code == 401
        bad = client.post("/v1/chat/completions", headers=headers,
                          json={"model": BASE, "messages": [], "logprobs": True})
        assert bad.status_code == 422 and bad.json()["error"]["param"]


def test_the_api_never_imports_the_generation_stack() -> None:
    """Inference routes included, the API process runs without torch, transformers or peft."""
    import subprocess
    import sys

    code = ("import sys, api.main; api.main.create_app(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=root)
    assert done.stdout.strip() == "[]"
