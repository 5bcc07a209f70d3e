"""Bad requests get OpenAI-shaped errors that name the problem; bad jobs fail, workers go on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import UPLOAD_LIMIT
from tests.support import (
    Stack,
    create_job,
    dialogsum_records,
    jsonl_bytes,
    upload_bytes,
    upload_dialogsum,
    wait_for_status,
)


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    return stack.http()


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 16).id


@pytest.fixture(scope="module")
def good_job(training_file: str, tiny_model: Path) -> dict[str, Any]:
    return {"model": str(tiny_model), "training_file": training_file, "max_steps": 4,
            "save_steps": 2, "max_length": 512}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of a response, after checking the status and OpenAI's shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


# --------------------------------------------------------------------------- 422: the request
@pytest.mark.parametrize(("extra", "param"), [
    ({"bogus": 1}, "bogus"),
    ({"lora": {"r": 8, "rank": 4}}, "lora.rank"),
    ({"hyperparameters": {"epochs": 2}}, "hyperparameters.epochs"),
])
def test_unknown_field_is_named(http: httpx.Client, good_job: dict, extra: dict,
                                param: str) -> None:
    error = error_of(http.post("/v1/fine_tuning/jobs", json={**good_job, **extra}), 422)

    assert error["param"] == param
    assert f"{param}: unknown field" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("extra", "param"), [
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"r": 8, "dropout": 1.5}}, "lora.dropout"),
    ({"max_steps": -1}, "max_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"learning_rate": 5}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_length": 8}, "max_length"),
    ({"prompt_format": "alpaca"}, "prompt_format"),
])
def test_out_of_range_hyperparameter_is_named(http: httpx.Client, good_job: dict, extra: dict,
                                              param: str) -> None:
    error = error_of(http.post("/v1/fine_tuning/jobs", json={**good_job, **extra}), 422)

    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(("extra", "param"), [
    ({"lora": {"r": 100_000}}, "lora.r"),
    ({"max_length": 100_000}, "max_length"),
])
def test_operator_limits_are_enforced(http: httpx.Client, good_job: dict, extra: dict,
                                      param: str) -> None:
    error = error_of(http.post("/v1/fine_tuning/jobs", json={**good_job, **extra}), 422)

    assert error["param"] == param
    assert "at most" in error["message"]


def test_steps_and_epochs_together_are_refused(http: httpx.Client, good_job: dict) -> None:
    error = error_of(http.post("/v1/fine_tuning/jobs", json={**good_job, "n_epochs": 2}), 422)

    assert "max_steps or n_epochs" in error["message"]


def test_sdk_raises_unprocessable_entity(client: openai.OpenAI, good_job: dict) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.fine_tuning.jobs.create(model=good_job["model"],
                                       training_file=good_job["training_file"],
                                       extra_body={"lora": {"r": 0}})

    assert exc.value.status_code == 422
    assert exc.value.param == "lora.r"


# --------------------------------------------------------------------------- 400: the data
def test_malformed_jsonl_names_the_line(http: httpx.Client) -> None:
    content = jsonl_bytes(dialogsum_records(2)) + b'{"dialogue": "unterminated\n'

    error = error_of(upload_bytes(http, content), 400)

    assert error["message"].startswith("line 3: invalid JSON")
    assert (error["param"], error["code"]) == ("file", "invalid_file")


def test_record_missing_a_column_names_the_line(http: httpx.Client) -> None:
    records = dialogsum_records(3)
    del records[1]["summary"]

    error = error_of(upload_bytes(http, jsonl_bytes(records)), 400)

    assert error["message"].startswith("line 2: missing column 'summary'")


def test_empty_file_names_line_1(http: httpx.Client) -> None:
    error = error_of(upload_bytes(http, b""), 400)

    assert error["message"].startswith("line 1: the file is empty")


def test_non_object_line(http: httpx.Client) -> None:
    error = error_of(upload_bytes(http, jsonl_bytes([*dialogsum_records(1), ["a", "list"]])),
                     400)

    assert error["message"].startswith("line 2: expected a JSON object")


def test_column_map_naming_a_missing_column_fails_the_job_naming_the_line(
    client: openai.OpenAI, http: httpx.Client, tiny_model: Path
) -> None:
    records = [{"conversation": r["dialogue"], "gist": r["summary"]}
               for r in dialogsum_records(3)]
    del records[2]["gist"]
    file = upload_bytes(client, jsonl_bytes(records))  # no known shape: checked per job

    r = http.post("/v1/fine_tuning/jobs", json={
        "model": str(tiny_model), "training_file": file.id,
        "column_map": {"dialogue": "conversation", "summary": "gist"}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "validating_files"
    job = wait_for_status(client, r.json()["id"], {"failed"})

    assert job.error is not None
    assert job.error.message.startswith("training_file line 3: ")
    assert job.error.param == "training_file"
    assert job.trained_tokens is None  # it never reached a worker


def test_upload_over_the_size_limit(http: httpx.Client) -> None:
    records = dialogsum_records(200)
    content = jsonl_bytes(records)
    assert len(content) > UPLOAD_LIMIT

    error = error_of(upload_bytes(http, content), 413)

    assert f"limit of {UPLOAD_LIMIT} bytes" in error["message"]
    assert error["code"] == "payload_too_large"


def test_huge_upload_is_refused_before_it_is_read(http: httpx.Client) -> None:
    content = b" " * (UPLOAD_LIMIT + 2 * 1024 * 1024)

    error_of(upload_bytes(http, content), 413)


# --------------------------------------------------------------------------- 404
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/files/file-doesnotexist"),
    ("GET", "/v1/files/file-doesnotexist/content"),
    ("DELETE", "/v1/files/file-doesnotexist"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-doesnotexist"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-doesnotexist/cancel"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-doesnotexist/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-doesnotexist/checkpoints"),
])
def test_unknown_ids_are_404(http: httpx.Client, method: str, path: str) -> None:
    error = error_of(http.request(method, path), 404)

    assert "doesnotexist" in error["message"]
    assert error["code"] == "not_found"


def test_job_with_an_unknown_training_file_is_404(http: httpx.Client, good_job: dict) -> None:
    r = http.post("/v1/fine_tuning/jobs", json={**good_job, "training_file": "file-nope"})

    assert "file-nope" in error_of(r, 404)["message"]


def test_sdk_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")


def test_files_of_another_project_are_invisible(stack: Stack, training_file: str) -> None:
    other = stack.http(stack.create_key("elsewhere"))

    error_of(other.get(f"/v1/files/{training_file}"), 404)


# --------------------------------------------------------------------------- 401
def test_no_api_key_is_401(stack: Stack) -> None:
    error = error_of(stack.http(key=None).get("/v1/fine_tuning/jobs"), 401)

    assert error["type"] == "authentication_error"
    assert "Authorization" in error["message"]


def test_wrong_api_key_is_401(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.openai("lf-not-a-real-key").fine_tuning.jobs.list()


def test_health_needs_no_key(stack: Stack) -> None:
    r = stack.http(key=None).get("/health")

    assert r.status_code == 200 and r.json()["status"] == "ok"


# --------------------------------------------------------------------------- models that fail
@pytest.fixture(scope="module")
def bad_models_then_a_good_one(
    client: openai.OpenAI, training_file: str, tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Two jobs whose base model cannot load (an empty folder; a hub id, offline), then a
    good job on the same worker."""
    empty = tmp_path_factory.mktemp("empty-model")
    bad = {model: create_job(client, model, training_file, max_steps=2)
           for model in (str(empty), "not-an-org/not-a-model")}
    failed = {model: wait_for_status(client, job.id, "failed", timeout=120)
              for model, job in bad.items()}
    good = create_job(client, str(tiny_model), training_file, max_steps=2, save_steps=2)
    return {"failed": failed, "good": wait_for_status(client, good.id, "succeeded", timeout=180)}


@pytest.mark.e2e
def test_model_that_fails_to_load_fails_the_job(bad_models_then_a_good_one: dict) -> None:
    for model, job in bad_models_then_a_good_one["failed"].items():
        assert job.error is not None
        assert (job.error.code, job.error.param) == ("model_load_failed", "model")
        assert model in job.error.message
        assert job.attempt == 1, "a model that does not load is not retried"
        assert job.finished_at is not None and job.adapter_path is None


@pytest.mark.e2e
def test_worker_trains_the_next_job_after_a_failure(
    stack: Stack, bad_models_then_a_good_one: dict
) -> None:
    good = bad_models_then_a_good_one["good"]

    assert good.status == "succeeded" and good.fine_tuned_model
    assert Path(good.adapter_path, "adapter_model.safetensors").is_file()
    assert stack.workers[0].alive()


# --------------------------------------------------------------------------- cancel
@pytest.mark.e2e
def test_cancel_of_a_finished_job_is_409(client: openai.OpenAI,
                                         bad_models_then_a_good_one: dict) -> None:
    done = bad_models_then_a_good_one["good"]
    failed = next(iter(bad_models_then_a_good_one["failed"].values()))

    with pytest.raises(openai.ConflictError) as exc:
        client.fine_tuning.jobs.cancel(done.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(failed.id)

    assert exc.value.status_code == 409
    assert "succeeded" in exc.value.message
    assert client.fine_tuning.jobs.retrieve(done.id).status == "succeeded"


@pytest.mark.e2e
def test_cancel_of_a_running_and_of_a_queued_job(client: openai.OpenAI, training_file: str,
                                                tiny_model: Path) -> None:
    running = create_job(client, str(tiny_model), training_file, max_steps=10_000,
                         save_steps=1000)
    wait_for_status(client, running.id, "running", timeout=120)
    # The stack's only worker is busy, so this one stays queued.
    queued = create_job(client, str(tiny_model), training_file)

    queued_answer = client.fine_tuning.jobs.cancel(queued.id)
    running_answer = client.fine_tuning.jobs.cancel(running.id)
    final = wait_for_status(client, running.id, "cancelled", timeout=60)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(running.id, limit=100)]

    assert queued_answer.status == "cancelled"  # at once: no worker holds it
    assert queued_answer.finished_at is not None
    assert client.fine_tuning.jobs.retrieve(queued.id).attempt == 0
    assert running_answer.status in ("running", "cancelled")  # running: stops at its next step
    assert final.finished_at is not None and final.adapter_path is None
    assert final.progress is None or final.progress["step"] < 10_000
    assert any(m.startswith("Job cancelled") for m in messages)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(queued.id)
