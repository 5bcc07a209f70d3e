"""Tenants: another project's objects behave exactly as if they did not exist.

Project A trains a job (files, events, checkpoints, a fine-tuned model). Project B, on the same
stack, then tries every route on A's ids and names: each answer is the 404 it gets for an id
that never existed, byte for byte once the id is masked, and A's objects are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.security.expect import error_of
from tests.support import Stack, dialogsum_records, jsonl_bytes, upload_bytes, wait_for_status
from tests.support.stack import free_port

pytestmark = pytest.mark.e2e

FAKE_HEX = "0" * 24


@pytest.fixture(scope="module")
def stack(make_module_stack: Any) -> Stack:
    # No engine listens at engine_url: A's inference requests resolve, then get 503.
    return make_module_stack(settings={"engine_url": f"http://127.0.0.1:{free_port()}"})


@pytest.fixture(scope="module")
def a(stack: Stack) -> httpx.Client:
    return stack.http()


@pytest.fixture(scope="module")
def b_key(stack: Stack) -> str:
    return stack.create_key("intruder")


@pytest.fixture(scope="module")
def b(stack: Stack, b_key: str) -> httpx.Client:
    return stack.http(b_key)


def upload(client: httpx.Client, n: int = 12) -> str:
    r = upload_bytes(client, jsonl_bytes(dialogsum_records(n)))
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def a_objects(a: httpx.Client, tiny_model: Path) -> dict[str, str]:
    """A's succeeded job and everything it made."""
    train, valid = upload(a), upload(a, 4)
    job = create(a, {"model": str(tiny_model), "training_file": train, "validation_file": valid,
                     "suffix": "mine", "max_steps": 2, "save_steps": 1, "max_length": 1024,
                     "lora": {"r": 4, "alpha": 8}})
    done = wait_for_status(a, job["id"], "succeeded", timeout=180)
    events = a.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    ckpts = a.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert events and ckpts
    return {"file": train, "valid": valid, "job": job["id"], "event": events[0]["id"],
            "ckpt": ckpts[0]["id"], "ft_model": done["fine_tuned_model"],
            "base_model": done["model"]}


@pytest.fixture(scope="module")
def b_objects(b: httpx.Client, a_objects: dict[str, str], tiny_model: Path) -> dict[str, str]:
    """B's own file and a job of B's (cancelled at once: B never serves the base model)."""
    train = upload(b, 4)
    job = create(b, {"model": str(tiny_model), "training_file": train, "max_steps": 10_000,
                     "max_length": 1024})
    assert b.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    wait_for_status(b, job["id"], "cancelled", timeout=120)
    return {"file": train, "job": job["id"]}


def fake(kind: str, real: str) -> str:
    """An id of the same shape as ``real`` that nobody has."""
    return {
        "file": f"file-{FAKE_HEX}",
        "job": f"ftjob-{FAKE_HEX}",
        "event": "ftevent-999999999",
        "ckpt": f"ftckpt-{FAKE_HEX}-1",
        "ft_model": real.rsplit(":", 1)[0] + f":ftjob-{FAKE_HEX}",
        "base_model": real + "-never-trained",
    }[kind]


Request = Callable[[str], tuple[str, str, dict[str, Any] | None]]
CHAT = [{"role": "user", "content": "hi"}]

# kind of A's object → (method, url, JSON body) of B's request that names it.
PROBES: dict[str, tuple[str, Request]] = {
    "retrieve file": ("file", lambda i: ("GET", f"/v1/files/{i}", None)),
    "download file": ("file", lambda i: ("GET", f"/v1/files/{i}/content", None)),
    "delete file": ("file", lambda i: ("DELETE", f"/v1/files/{i}", None)),
    "page files after": ("file", lambda i: ("GET", f"/v1/files?after={i}", None)),
    "retrieve job": ("job", lambda i: ("GET", f"/v1/fine_tuning/jobs/{i}", None)),
    "cancel job": ("job", lambda i: ("POST", f"/v1/fine_tuning/jobs/{i}/cancel", None)),
    "list events": ("job", lambda i: ("GET", f"/v1/fine_tuning/jobs/{i}/events", None)),
    "list checkpoints": ("job", lambda i: ("GET", f"/v1/fine_tuning/jobs/{i}/checkpoints",
                                           None)),
    "page jobs after": ("job", lambda i: ("GET", f"/v1/fine_tuning/jobs?after={i}", None)),
    "retrieve model": ("ft_model", lambda i: ("GET", f"/v1/models/{i}", None)),
    "completion": ("ft_model", lambda i: ("POST", "/v1/completions",
                                          {"model": i, "prompt": "hi", "max_tokens": 2})),
    "chat completion": ("ft_model", lambda i: ("POST", "/v1/chat/completions",
                                               {"model": i, "messages": CHAT})),
    "completion on the base model": ("base_model", lambda i: (
        "POST", "/v1/completions", {"model": i, "prompt": "hi", "max_tokens": 2})),
    "retrieve base model": ("base_model", lambda i: ("GET", f"/v1/models/{i}", None)),
}


def send(client: httpx.Client, method: str, url: str, body: dict[str, Any] | None
         ) -> httpx.Response:
    return client.request(method, url, json=body) if body is not None else client.request(
        method, url)


@pytest.mark.parametrize("probe", list(PROBES))
def test_another_projects_object_answers_as_if_it_did_not_exist(
    a: httpx.Client, b: httpx.Client, a_objects: dict[str, str], probe: str
) -> None:
    kind, request = PROBES[probe]
    real, absent = a_objects[kind], fake(kind, a_objects[kind])

    theirs = send(b, *request(real))
    nobodys = send(b, *request(absent))
    method, url, body = request(real)
    own = send(a, "GET" if method == "DELETE" else method, url, body)  # A keeps its file

    error_of(theirs, 404)
    assert theirs.status_code == nobodys.status_code
    assert theirs.text.replace(real, "<id>") == nobodys.text.replace(absent, "<id>")
    assert theirs.headers.get("content-type") == nobodys.headers.get("content-type")
    # The id is real: its own project gets past the lookup (cancel of a finished job: 409;
    # inference: 503, no engine runs here).
    assert own.status_code in (200, 409, 503), own.text


@pytest.mark.parametrize("kind", ["event", "ckpt"])
def test_another_jobs_cursor_does_not_exist_in_mine(
    b: httpx.Client, a_objects: dict[str, str], b_objects: dict[str, str], kind: str
) -> None:
    listing = "events" if kind == "event" else "checkpoints"
    url = f"/v1/fine_tuning/jobs/{b_objects['job']}/{listing}?after="
    real, absent = a_objects[kind], fake(kind, a_objects[kind])

    theirs, nobodys = b.get(url + real), b.get(url + absent)

    assert error_of(theirs, 404)["param"] == "after"
    assert theirs.text.replace(real, "<id>") == nobodys.text.replace(absent, "<id>")


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_job_cannot_read_another_projects_file(
    stack: Stack, b: httpx.Client, a_objects: dict[str, str], b_objects: dict[str, str],
    tiny_model: Path, field: str,
) -> None:
    body = {"model": str(tiny_model), "training_file": b_objects["file"], "max_steps": 2,
            field: a_objects["file"]}
    jobs_before = stack.sql("SELECT count(*) FROM jobs")[0][0]

    error = error_of(b.post("/v1/fine_tuning/jobs", json=body), 404)

    assert error["param"] == field
    assert error["message"] == f"{field}: no such file: {a_objects['file']}"
    assert stack.sql("SELECT count(*) FROM jobs")[0][0] == jobs_before


def test_listings_show_only_the_projects_own_objects(
    a: httpx.Client, b: httpx.Client, a_objects: dict[str, str], b_objects: dict[str, str]
) -> None:
    def ids(client: httpx.Client, url: str) -> set[str]:
        r = client.get(url)
        assert r.status_code == 200, r.text
        return {item["id"] for item in r.json()["data"]}

    a_files, b_files = ids(a, "/v1/files"), ids(b, "/v1/files")
    a_jobs, b_jobs = ids(a, "/v1/fine_tuning/jobs"), ids(b, "/v1/fine_tuning/jobs")
    a_models, b_models = ids(a, "/v1/models"), ids(b, "/v1/models")

    assert {a_objects["file"], a_objects["valid"]} <= a_files
    assert a_files.isdisjoint(b_files) and b_objects["file"] in b_files
    assert a_objects["job"] in a_jobs and b_jobs == {b_objects["job"]}
    assert {a_objects["ft_model"], a_objects["base_model"]} <= a_models
    assert b_models == set()


def test_the_other_projects_attempts_changed_nothing(
    a: httpx.Client, a_objects: dict[str, str]
) -> None:
    # Runs after B's delete and cancel attempts above.
    job = a.get(f"/v1/fine_tuning/jobs/{a_objects['job']}").json()
    content = a.get(f"/v1/files/{a_objects['file']}/content")

    assert job["status"] == "succeeded"
    assert content.status_code == 200 and content.content == jsonl_bytes(dialogsum_records(12))


def test_keys_never_reach_logs_events_or_storage(
    stack: Stack, a: httpx.Client, b: httpx.Client, b_key: str, a_objects: dict[str, str]
) -> None:
    near_miss = stack.key[:-1] + ("x" if stack.key[-1] != "x" else "y")
    stack.http(near_miss).get("/v1/files")
    stack.http(key=None, headers={"Authorization": stack.key}).get("/v1/files")  # no scheme
    a.get(f"/v1/fine_tuning/jobs/{a_objects['job']}/events")
    b.get("/v1/models")
    secrets = [stack.key, b_key, near_miss]

    stored = [p for p in stack.storage_dir.rglob("*") if p.is_file()]
    leaks = [f"{p.relative_to(stack.storage_dir)} has {s[:6]}…" for p in stored
             for s in secrets if s.encode() in p.read_bytes()]
    events = a.get(f"/v1/fine_tuning/jobs/{a_objects['job']}/events?limit=100").text

    assert '"GET /v1/files HTTP/1.1" 401' in stack.api.log()  # the access log is on
    assert any(p.suffix == ".db" for p in stored)
    assert leaks == []
    assert not any(s in events for s in secrets)
