"""OpenAI's metrics, early stopping and the W&B integration, through the SDK, on a real Celery
worker: one job that logs to W&B (offline: there is no key here) and stops early, supervised on
each backend and DPO (whose reward metrics go everywhere the loss goes)."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import (
    BACKENDS,
    EMBEDDED,
    Stack,
    create_job,
    list_all_events,
    upload_dialogsum,
)
from tests.support.preference import upload_preference
from tests.support.wandb_files import wandb_history, wandb_run_record

pytestmark = pytest.mark.e2e

torch = pytest.importorskip("torch")
pytest.importorskip("wandb")

PATIENCE = 2
SAVE_STEPS = 2
WANDB = {"project": "lorafleet-e2e", "name": "early-stop", "tags": ["e2e", "tiny"]}
# What a DPO job reports beside the loss (worker.training.dpo.METRICS).
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module", params=[
    *(pytest.param((b.values[0], "supervised"), id=b.id) for b in BACKENDS),
    pytest.param((EMBEDDED, "dpo"), id=f"{EMBEDDED}-dpo")])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, method): supervised on each backend, DPO on one."""
    return request.param


@pytest.fixture(scope="module")
def method(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture(scope="module")
def stack(case: tuple[str, str], make_module_stack: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """One stack per case. One checkpoint kept per job (the best must survive anyway); no
    W&B account: no key, no netrc, W&B's own folders in tmp."""
    home = tmp_path_factory.mktemp("wandb-home")
    env = {"WANDB_API_KEY": "", "NETRC": str(home / "netrc"),
           **{name: str(home / name.lower())
              for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}}
    return make_module_stack(backend=case[0], settings={"keep_checkpoints": 1}, env=env)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.openai()


def own_metrics(method: str) -> tuple[str, ...]:
    """The metrics a job of ``method`` reports beside OpenAI's."""
    return DPO_METRICS if method == "dpo" else ()


@pytest.fixture(scope="module")
def run(client: openai.OpenAI, tiny_model: Path, method: str) -> dict[str, Any]:
    """A job whose threshold no evaluation reaches: it stops after PATIENCE evaluations past
    the first. Watched until it ends; what it showed while running is kept."""
    if method == "dpo":
        train, valid = upload_preference(client, 16), upload_preference(client, 4, "validation")
        options: dict[str, Any] = {"method": {"type": "dpo"}, "learning_rate": 1e-2,
                                   "max_length": 1024}
    else:
        train, valid = upload_dialogsum(client, 16), upload_dialogsum(client, 4, "validation")
        options = {"learning_rate": 1.0}
    created = create_job(
        client, str(tiny_model), train.id, validation_file=valid.id, max_steps=12,
        save_steps=SAVE_STEPS, batch_size=2, early_stopping_patience=PATIENCE,
        early_stopping_threshold=100.0, integrations=[{"type": "wandb", "wandb": WANDB}],
        **options)
    estimates: list[int] = []
    deadline = time.monotonic() + 300
    job = client.fine_tuning.jobs.retrieve(created.id)
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        if job.status == "running" and job.estimated_finish is not None:
            estimates.append(job.estimated_finish)
        time.sleep(0.05)
        job = client.fine_tuning.jobs.retrieve(created.id)
    assert job.status == "succeeded", job.error
    events = list_all_events(client, job.id)
    return {"job": job, "events": events, "estimates": estimates,
            "checkpoints": client.fine_tuning.jobs.checkpoints.list(job.id).data}


def metrics_events(events: list[Any], key: str) -> dict[int, dict[str, Any]]:
    """The data of the ``metrics`` events that carry ``key``, by step."""
    return {e.data["step"]: e.data for e in events
            if e.type == "metrics" and e.data and key in e.data
            and not e.message.startswith("Checkpoint")}


def test_early_stopping_ends_the_job_with_the_best_checkpoint(stack: Stack,
                                                             run: dict[str, Any]) -> None:
    job, events = run["job"], run["events"]
    stop_step = SAVE_STEPS * (PATIENCE + 1)
    valid = metrics_events(events, "valid_loss")
    best = min(valid, key=lambda s: (valid[s]["valid_loss"], s))

    [stop] = [e for e in events if e.message.startswith("Early stopping at step")]
    assert (stop.data["step"], stop.data["best_step"]) == (stop_step, best)
    assert stop.data["best_valid_loss"] == valid[best]["valid_loss"]
    assert f"step {best}" in stop.message
    assert job.progress["step"] == stop_step and sorted(valid) == [2, 4, 6]
    assert (job.early_stopping_patience, job.early_stopping_threshold) == (PATIENCE, 100.0)
    # Retention keeps one checkpoint, and the best one besides.
    by_step = {c.step_number: c for c in run["checkpoints"]}
    assert set(by_step) == {stop_step, best}
    from safetensors.torch import load_file

    adapter = stack.local_folder(job.adapter_path)
    delivered = load_file(adapter / "adapter_model.safetensors")
    saved = load_file(stack.local_folder(by_step[best].path) / "adapter_model.safetensors")
    assert all(torch.equal(delivered[k], saved[k]) for k in saved)
    assert json.loads((adapter / "lorafleet.json").read_text())["best_step"] == best


def test_metrics_have_openais_names(run: dict[str, Any], method: str) -> None:
    events, checkpoints = run["events"], run["checkpoints"]
    train = metrics_events(events, "train_loss")
    valid = metrics_events(events, "valid_loss")
    names = own_metrics(method)

    assert sorted(train) == list(range(1, 7))
    assert all(0 <= d["train_mean_token_accuracy"] <= 1 for d in train.values())
    assert all(0 <= d["valid_mean_token_accuracy"] <= 1 for d in valid.values())
    [full] = [e for e in events if e.message.startswith("Full validation at step 6")]
    assert full.data["full_valid_loss"] == valid[6]["valid_loss"]
    assert full.data["full_valid_mean_token_accuracy"] == valid[6]["valid_mean_token_accuracy"]
    # The method's own metrics, with every loss they go with.
    assert all(set(names) <= set(d) for d in train.values())
    assert all({f"valid_{n}" for n in names} <= set(d) for d in valid.values())
    assert all(full.data[f"full_valid_{n}"] == valid[6][f"valid_{n}"] for n in names)
    for ckpt in checkpoints:
        m, step = ckpt.metrics, ckpt.step_number
        assert m.step == step and m.train_loss == train[step]["train_loss"]
        assert m.train_mean_token_accuracy == train[step]["train_mean_token_accuracy"]
        assert m.valid_loss == valid[step]["valid_loss"]
        assert m.valid_mean_token_accuracy == valid[step]["valid_mean_token_accuracy"]
        # Training ended at step 6: that checkpoint's evaluation is the full validation.
        assert (m.full_valid_loss is not None) == (step == 6)
        for n in names:
            assert m.model_extra[n] == train[step][n]
            assert m.model_extra[f"valid_{n}"] == valid[step][f"valid_{n}"]
    [last] = [c for c in checkpoints if c.step_number == 6]
    assert last.metrics.full_valid_loss == last.metrics.valid_loss


def test_the_results_file_has_every_steps_metrics(client: openai.OpenAI, run: dict[str, Any],
                                                  method: str) -> None:
    job, events = run["job"], run["events"]
    train = metrics_events(events, "train_loss")
    valid = metrics_events(events, "valid_loss")

    [file_id] = job.result_files
    info = client.files.retrieve(file_id)
    text = client.files.content(file_id).text
    rows = list(csv.DictReader(io.StringIO(text)))

    assert (info.purpose, info.filename) == ("fine-tune-results", "step_metrics.csv")
    assert file_id in {f.id for f in client.files.list(purpose="fine-tune-results")}
    names = own_metrics(method)
    assert text.splitlines()[0].split(",") == [
        "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
        *names, *(f"valid_{n}" for n in names)]
    assert [int(r["step"]) for r in rows] == sorted(train)
    for r in rows:
        step = int(r["step"])
        assert float(r["train_loss"]) == train[step]["train_loss"]
        assert float(r["train_accuracy"]) == train[step]["train_mean_token_accuracy"]
        assert all(float(r[n]) == train[step][n] for n in names)
        if step in valid:
            assert float(r["valid_loss"]) == valid[step]["valid_loss"]
            assert float(r["valid_mean_token_accuracy"]) == (
                valid[step]["valid_mean_token_accuracy"])
            assert all(float(r[f"valid_{n}"]) == valid[step][f"valid_{n}"] for n in names)
        else:
            assert r["valid_loss"] == r["valid_mean_token_accuracy"] == ""


def test_trained_tokens_and_estimated_finish(stack: Stack, run: dict[str, Any]) -> None:
    job = run["job"]
    meta = json.loads((stack.local_folder(job.adapter_path) / "lorafleet.json").read_text())

    assert job.trained_tokens == meta["trained_tokens"] > 0
    assert job.estimated_finish is None  # set while running only, as OpenAI's
    assert all(math.isfinite(t) and t >= job.created_at for t in run["estimates"])


def test_the_wandb_run_is_offline_and_holds_the_losses(stack: Stack, run: dict[str, Any],
                                                       method: str) -> None:
    job, events = run["job"], run["events"]
    train = metrics_events(events, "train_loss")
    valid = metrics_events(events, "valid_loss")

    [said] = [e for e in events if (e.data or {}).get("integration") == "wandb"]
    folder = Path(said.data["path"])
    history = wandb_history(folder)
    record = wandb_run_record(folder)

    assert job.integrations[0].type == "wandb"
    assert job.integrations[0].wandb.project == WANDB["project"]
    assert said.data["mode"] == "offline" and f"wandb sync {folder}" in said.message
    # A folder of the worker's node: under the job's storage folder on file storage, else
    # under the worker's cache.
    assert job.id in folder.parts
    assert folder.is_relative_to(stack.storage_dir if stack.storage == "file"
                                 else stack.cache_root)
    assert {s: h["train_loss"] for s, h in history.items()} == {
        s: d["train_loss"] for s, d in train.items()}
    assert {s: history[s]["valid_loss"] for s in valid} == {
        s: d["valid_loss"] for s, d in valid.items()}
    for n in own_metrics(method):
        assert {s: h[n] for s, h in history.items()} == {s: d[n] for s, d in train.items()}
    assert (record["project"], record["display_name"], record["tags"]) == (
        WANDB["project"], WANDB["name"], WANDB["tags"])
    assert record["run_id"] == job.id


# --------------------------------------------------------------------------- bad input
def job_count(client: openai.OpenAI) -> int:
    return len(client.fine_tuning.jobs.list(limit=100).data)


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"integrations": [{"type": "comet", "wandb": {"project": "p"}}]}, 422,
     "integrations.0.type"),
    ({"integrations": [{"type": "wandb", "wandb": {"name": "no project"}}]}, 422,
     "integrations.0.wandb.project"),
    ({"early_stopping_patience": 2}, 400, "early_stopping_patience"),
    ({"early_stopping_threshold": 0.1, "validation_file": "VALID"}, 400,
     "early_stopping_threshold"),
])
def test_bad_job_options_are_named_and_create_nothing(
    client: openai.OpenAI, tiny_model: Path, fields: dict[str, Any], status: int, param: str
) -> None:
    train = upload_dialogsum(client, 4)
    if fields.get("validation_file") == "VALID":
        fields = {**fields, "validation_file": upload_dialogsum(client, 2, split="validation").id}
    before = job_count(client)

    with pytest.raises(openai.APIStatusError) as exc:
        create_job(client, str(tiny_model), train.id, **fields)

    assert exc.value.status_code == status
    assert exc.value.body["param"] == param
    assert param in exc.value.body["message"]
    assert job_count(client) == before


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_results_file_is_no_training_data(client: openai.OpenAI, tiny_model: Path,
                                            run: dict[str, Any], field: str) -> None:
    [results] = run["job"].result_files
    train = upload_dialogsum(client, 4)
    before = job_count(client)

    with pytest.raises(openai.BadRequestError) as exc:
        create_job(client, str(tiny_model), results if field == "training_file" else train.id,
                   **({"validation_file": results} if field == "validation_file" else {}))

    assert exc.value.body["param"] == field
    assert "fine-tune-results" in exc.value.body["message"]
    assert job_count(client) == before
