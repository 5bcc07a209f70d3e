"""Malformed and hostile input: each gets its documented 4xx (or a ``failed`` job with a
reason), nothing is half-stored, no server path is read, and the worker goes on serving.

All cases run against one live stack, in order; the last test trains a good job on it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.security.expect import error_of, snapshot
from tests.support import (
    BACKENDS,
    Stack,
    dialogsum_records,
    jsonl_bytes,
    upload_bytes,
    wait_for_status,
)

UPLOAD_LIMIT = 200_000
LINE_LIMIT = 300
RECORD_LIMIT = 20_000
REQUEST_LIMIT = 64 * 1024
GOOD = dialogsum_records(3)
GOOD_LINES = jsonl_bytes(GOOD)


@pytest.fixture(scope="module")
def stack(make_module_stack: Any) -> Stack:
    return make_module_stack(settings={
        "max_upload_bytes": UPLOAD_LIMIT, "max_upload_lines": LINE_LIMIT,
        "max_record_chars": RECORD_LIMIT, "max_request_bytes": REQUEST_LIMIT})


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    return stack.http()


@pytest.fixture(scope="module")
def worker_pid(stack: Stack) -> int:
    """The worker's pid before any hostile input."""
    return stack.workers[0].pid


@pytest.fixture(scope="module")
def ctx(stack: Stack, http: httpx.Client, tiny_model: Path, worker_pid: int,
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the cases refer to: a good file, the tiny model, a symlink out of the models
    folder."""
    r = upload_bytes(http, jsonl_bytes(dialogsum_records(16)))
    assert r.status_code == 200, r.text
    links = tmp_path_factory.mktemp("links")
    os.symlink("/usr", links / "escape")
    job = http.post("/v1/fine_tuning/jobs", json={
        "model": str(tiny_model), "training_file": r.json()["id"], "max_steps": 10_000})
    assert job.status_code == 200, job.text
    http.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
    return {"file": r.json()["id"], "model": str(tiny_model), "symlink": str(links / "escape"),
            "job": job.json()["id"]}


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One hostile request and the answer it must get."""

    send: Callable[[httpx.Client, dict[str, Any]], httpx.Response]
    status: int
    param: str | None = None
    says: str = ""  # a fragment of the error message


def upload(content: bytes, filename: str = "data.jsonl", purpose: str = "fine-tune"
           ) -> Callable[[httpx.Client, dict[str, Any]], httpx.Response]:
    return lambda http, _: http.post("/v1/files", data={"purpose": purpose},
                                     files={"file": (filename, content, "application/jsonl")})


def job(**fields: Any) -> Callable[[httpx.Client, dict[str, Any]], httpx.Response]:
    """A job request: the good job with ``fields`` replaced (callables get the context)."""
    def send(http: httpx.Client, ctx: dict[str, Any]) -> httpx.Response:
        body = {"model": ctx["model"], "training_file": ctx["file"], "max_steps": 2}
        body.update({k: v(ctx) if callable(v) else v for k, v in fields.items()})
        return http.post("/v1/fine_tuning/jobs", json=body)
    return send


def raw_job(text: str) -> Callable[[httpx.Client, dict[str, Any]], httpx.Response]:
    """A job request sent as these exact characters (``{file}``, ``{model}`` filled in)."""
    def send(http: httpx.Client, ctx: dict[str, Any]) -> httpx.Response:
        body = text.replace("{file}", ctx["file"]).replace("{model}", ctx["model"])
        return http.post("/v1/fine_tuning/jobs", content=body.encode(),
                         headers={"content-type": "application/json"})
    return send


def get(url: str) -> Callable[[httpx.Client, dict[str, Any]], httpx.Response]:
    return lambda http, ctx: http.get(url.format(**ctx))


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "completion": "x"}\n'


CASES: dict[str, Case] = {
    # ---- uploads: the file is stored only if every line is good
    "0-byte file": Case(upload(b""), 400, "file", "the file is empty"),
    "one bad line among good ones": Case(
        upload(GOOD_LINES + b'{"dialogue": "x", "summary": \n' + GOOD_LINES), 400, "file",
        "line 4: invalid JSON"),
    "not UTF-8": Case(upload(GOOD_LINES + b'{"prompt": "\xff\xfe", "completion": "x"}\n'),
                      400, "file", "line 4: not valid UTF-8"),
    "a lone surrogate in a record": Case(
        upload(b'{"prompt": "caf\\ud800", "completion": "x"}\n'), 400, "file",
        "lone UTF-16 surrogate"),
    "a line that is a list": Case(upload(GOOD_LINES + b"[1, 2]\n"), 400, "file",
                                  "line 4: expected a JSON object"),
    "JSON nested 5000 deep": Case(upload(nested(5000)), 400, "file", "nested too deeply"),
    "a record over max_record_chars": Case(
        upload(json.dumps({"prompt": "x" * RECORD_LIMIT, "completion": "y"}).encode() + b"\n"),
        400, "file", f"the limit is {RECORD_LIMIT}"),
    "more lines than max_upload_lines": Case(
        upload(b'{"prompt": "p", "completion": "c"}\n' * (LINE_LIMIT + 1)), 413, "file",
        f"more than {LINE_LIMIT} lines"),
    "a file over max_upload_bytes": Case(
        upload(b'{"prompt": "' + b"p" * (UPLOAD_LIMIT + 10) + b'", "completion": "c"}\n'),
        413, "file", f"limit of {UPLOAD_LIMIT} bytes"),
    "an unknown purpose": Case(upload(GOOD_LINES, purpose="../../etc"), 400, "purpose",
                               "purpose must be one of"),
    # ---- job requests
    "broken JSON": Case(raw_job('{"model": "{model}", "training_file": '), 400, None,
                        "not valid JSON"),
    "a JSON list body": Case(raw_job('["{model}", "{file}"]'), 422),
    "max_steps of the wrong type": Case(job(max_steps="ten"), 422, "max_steps"),
    "negative max_steps": Case(job(max_steps=-5), 422, "max_steps"),
    "a 31-digit max_steps": Case(job(max_steps=10**30), 422, "max_steps", "at most"),
    "a billion-rank LoRA": Case(job(lora={"r": 10**9}), 422, "lora.r", "at most"),
    "NaN learning rate": Case(raw_job(
        '{"model": "{model}", "training_file": "{file}", "learning_rate": NaN}'), 422,
        "learning_rate"),
    "infinite warmup": Case(raw_job(
        '{"model": "{model}", "training_file": "{file}", "warmup": Infinity}'), 422, "warmup"),
    "a million epochs": Case(job(max_steps=None, n_epochs=1e6), 422, "n_epochs", "at most"),
    "zero epochs, OpenAI style": Case(job(max_steps=None, hyperparameters={"n_epochs": 0}),
                                      422, "hyperparameters.n_epochs"),
    "a string where a multiplier goes": Case(job(hyperparameters={
        "learning_rate_multiplier": "fast"}), 422, "hyperparameters.learning_rate_multiplier"),
    "an unknown field": Case(job(trust_remote_code=True), 422, "trust_remote_code",
                             "unknown field"),
    "a lone surrogate in metadata": Case(raw_job(
        '{"model": "{model}", "training_file": "{file}", "metadata": {"k": "\\udc00"}}'),
        400, None, "lone UTF-16 surrogate"),
    "a body over max_request_bytes": Case(job(column_map={"x": "y" * 100, **{
        f"c{i}": "z" * 100 for i in range(700)}}), 413, None, f"limit of {REQUEST_LIMIT}"),
    # ---- names that could become paths
    "model ../../etc": Case(job(model="../../etc"), 400, "model"),
    "model /etc, outside the models folder": Case(job(model="/etc"), 400, "model",
                                                  "models folder"),
    "model with .. out of the models folder": Case(
        job(model=lambda c: f"{c['model']}/../../../../../../etc"), 400, "model",
        "models folder"),
    "model symlinked out of the models folder": Case(job(model=lambda c: c["symlink"]), 400,
                                                     "model", "models folder"),
    "model in the home folder": Case(job(model="~/models/phi-2"), 400, "model"),
    "model with a NUL": Case(job(model="microsoft/phi\x00-2"), 400, "model"),
    "model with RTL override": Case(job(model="\u202e2-ihp/tfosorcim"), 400, "model"),
    "model naming a server folder": Case(job(model="shared/samples"), 400, "model"),
    "suffix ../../x": Case(job(suffix="../../x"), 422, "suffix"),
    "suffix with a NUL": Case(job(suffix="a\x00b"), 422, "suffix"),
    "training_file ../../etc/passwd": Case(job(training_file="../../../etc/passwd"), 404,
                                           "training_file"),
    "training_file that never existed": Case(job(training_file="file-0"), 404, "training_file"),
    "validation_file /etc/passwd": Case(job(validation_file="/etc/passwd"), 404,
                                        "validation_file"),
    "template injection": Case(job(prompt_format={
        "type": "custom", "prompt_template": "{dialogue.__class__.__init__.__globals__}",
        "response_template": "{summary}"}), 422, "prompt_format"),
    "file id traversal": Case(get("/v1/files/..%2F..%2Fetc%2Fpasswd/content"), 404),
    "job id traversal": Case(get("/v1/fine_tuning/jobs/..%2F..%2Fetc"), 404),
    "checkpoint cursor traversal": Case(
        get("/v1/fine_tuning/jobs/{job}/checkpoints?after=..%2F..%2Fetc%2Fpasswd"), 404,
        "after"),
    "event cursor of 40 digits": Case(
        get("/v1/fine_tuning/jobs/{job}/events?after=ftevent-" + "9" * 40), 404, "after"),
    "model name traversal": Case(get("/v1/models/..%2F..%2Fetc%2Fpasswd"), 404, "model"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_and_nothing_is_kept(
    stack: Stack, http: httpx.Client, ctx: dict[str, Any], name: str
) -> None:
    case = CASES[name]
    before = snapshot(stack)

    error = error_of(case.send(http, ctx), case.status)

    assert error["param"] == case.param
    assert case.says in error["message"]
    assert snapshot(stack) == before  # no file row, no stored file, no job row


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 20


def test_upload_names_never_become_paths(stack: Stack, http: httpx.Client) -> None:
    r = upload_bytes(http, GOOD_LINES, "../../../../tmp/\u202eevil\x00.jsonl")

    assert r.status_code == 200, r.text
    file = r.json()
    # The base name only, printable characters only (httpx sends the NUL as %00).
    assert file["filename"].startswith("evil") and file["filename"].endswith(".jsonl")
    assert "/" not in file["filename"] and file["filename"].isprintable()
    assert (stack.storage_dir / "files" / f"{file['id']}.jsonl").read_bytes() == GOOD_LINES
    stored = [p.name for p in (stack.storage_dir / "files").iterdir()]
    assert all(re.fullmatch(r"file-[0-9a-f]{24}\.jsonl", n) for n in stored), stored


# --------------------------------------------------------------------------- jobs that fail
@pytest.mark.e2e
def test_a_data_set_longer_than_max_length_fails_the_job_with_a_reason(
    http: httpx.Client, ctx: dict[str, Any]
) -> None:
    long = [{"prompt": "word " * 400, "completion": "more " * 10} for _ in range(4)]
    file_id = upload_bytes(http, jsonl_bytes(long)).json()["id"]

    r = http.post("/v1/fine_tuning/jobs", json={
        "model": ctx["model"], "training_file": file_id, "max_steps": 2, "max_length": 64})
    assert r.status_code == 200, r.text
    failed = wait_for_status(http, r.json()["id"], "failed", timeout=120)

    assert failed["error"]["param"] == "max_length"
    assert "all 4 examples reach max_length=64" in failed["error"]["message"]
    assert failed["attempt"] == 1  # bad data is not retried


@pytest.mark.e2e
def test_the_worker_serves_a_good_job_after_all_that(
    stack: Stack, http: httpx.Client, ctx: dict[str, Any], worker_pid: int
) -> None:
    r = http.post("/v1/fine_tuning/jobs", json={
        "model": ctx["model"], "training_file": ctx["file"], "max_steps": 2, "save_steps": 2,
        "max_length": 1024, "lora": {"r": 4, "alpha": 8}})
    assert r.status_code == 200, r.text

    done = wait_for_status(http, r.json()["id"], "succeeded", timeout=180)

    assert done["fine_tuned_model"]
    assert stack.workers[0].alive() and stack.workers[0].pid == worker_pid
    assert "Traceback" not in stack.api.log()  # no request crashed the API either


# --------------------------------------------------------------------------- every database
ODD_IDS = ["file-\x00", "a" * 5000, "\U0001f600", "ftjob-x\u202e", "%00"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_ids_are_not_found_on_every_database(make_stack: Any, backend: str) -> None:
    """PostgreSQL refuses NUL in text: such ids must end as 404s, never as database errors."""
    stack = make_stack(backend=backend, workers=0)
    http = stack.http()
    job_id = http.post("/v1/fine_tuning/jobs", json={
        "model": "org/model", "training_file": upload_bytes(http, GOOD_LINES).json()["id"]}
    ).json()["id"]

    for odd in ODD_IDS:
        quoted = quote(odd, safe="")
        for url in (f"/v1/files/{quoted}", f"/v1/files/{quoted}/content",
                    f"/v1/fine_tuning/jobs/{quoted}", f"/v1/fine_tuning/jobs/{quoted}/events",
                    f"/v1/models/{quoted}"):
            error_of(http.get(url), 404)
        for params in ({"after": odd},):
            error_of(http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params=params),
                     404)
            error_of(http.get("/v1/files", params=params), 404)
            error_of(http.get("/v1/fine_tuning/jobs", params=params), 404)
        if len(odd) <= 64:  # longer is refused by the request schemas (422)
            error_of(http.post("/v1/completions", json={"model": odd, "prompt": "x"}), 404)
            error_of(http.post("/v1/fine_tuning/jobs", json={
                "model": "org/model", "training_file": odd}), 404)
    assert "Traceback" not in stack.api.log()
