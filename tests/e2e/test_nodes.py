"""Nodes that share no disk: the API, two workers and the inference engine as separate
processes, each with a cache folder of its own and no folder in common, on PostgreSQL, Redis
and a SeaweedFS of this module's own (which a test stops for a while).

The tests run in order on one installation: a twin job runs through; a job's worker is killed
while it commits a checkpoint, and the job resumes on the other worker from the checkpoint in
S3, ending with the twin's adapter bit for bit; the engine serves it from its own cache; the
store is stopped for 10 s under a third job, which still succeeds; deleting the model leaves
none of its objects; and the bucket then holds exactly what the database says exists.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.serving_latency import stop_engine
from shared import storage
from shared.storage import MANIFEST, Store, folders
from tests.engine.conftest import VLLM_PYTHON, start_engine, vllm_available, warm_up
from tests.resilience.conftest import (
    FAST_LEASE,
    JOB,
    WORKER_ENV,
    adapter_tensors,
    attempts,
    commit_gate_env,
    job_row,
    owner_index,
    wait_until,
)
from tests.support import REDIS_POSTGRES, Stack, create_job, list_all_events, upload_dialogsum
from tests.support.jobs import wait_for_status
from tests.support.seaweedfs import SeaweedFS
from tests.support.stack import StackFactory, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

torch = pytest.importorskip("torch")

NODE_JOB = {**JOB, "max_steps": 16}  # a checkpoint every 4 steps
OUTAGE_SECONDS = 10.0


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """This module's S3 server: the tests stop and start it."""
    server = SeaweedFS(tmp_path_factory.mktemp("store"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def nodes(make_module_stack: StackFactory, store_server: SeaweedFS, gate: Path,
          tiny_model: Path) -> Iterator[tuple[Stack, str]]:
    """The installation, and the engine's URL."""
    backend = "vllm" if vllm_available() else "builtin"
    port = free_port()
    stack = make_module_stack(
        backend=REDIS_POSTGRES, storage="s3", s3=store_server, workers=2,
        env={**WORKER_ENV, **commit_gate_env(gate)},
        settings={**FAST_LEASE, "models_dir": str(tiny_model.parent),
                  "engine_port": port, "engine_url": f"http://127.0.0.1:{port}",
                  "engine_device": "cpu", "engine_torch_threads": 1,
                  "engine_backend": backend, "vllm_python": str(VLLM_PYTHON)})
    assert port != stack.port, "the engine and the API got the same port"
    proc, _ = start_engine(stack, port)
    try:
        if backend == "vllm":
            warm_up(f"http://127.0.0.1:{port}", tiny_model)
        yield stack, f"http://127.0.0.1:{port}"
    finally:
        stop_engine(proc)


@pytest.fixture(scope="module")
def client(nodes: tuple[Stack, str]) -> openai.OpenAI:
    return nodes[0].openai(timeout=300)


@pytest.fixture(scope="module")
def file_id(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 48).id


@pytest.fixture(scope="module")
def twin(client: openai.OpenAI, file_id: str, tiny_model: Path) -> Any:
    """The job that runs through uninterrupted."""
    job = create_job(client, str(tiny_model), file_id, **NODE_JOB)
    return wait_for_status(client, job.id, "succeeded", timeout=300)


@pytest.fixture(scope="module")
def resumed(nodes: tuple[Stack, str], client: openai.OpenAI, file_id: str, tiny_model: Path,
            gate: Path, twin: Any) -> dict[str, Any]:
    """The same job, whose worker is SIGKILLed while it commits checkpoint 8 (files
    uploaded, manifest not written) and trains on (held at the save of step 12)."""
    stack = nodes[0]
    (gate / "hold-commit-8").touch()
    (gate / "hold-12").touch()
    job = create_job(client, str(tiny_model), file_id, **NODE_JOB)
    wait_until(lambda: (gate / "waiting-commit-8").exists() and (gate / "waiting-12").exists(),
               timeout=300, what="the worker held mid-commit and mid-training")
    store = stack.store()
    half = storage.checkpoint_key(job.id, 1, 8)
    seen = {"uploaded": store.list(half + "/"), "last_good": job_row(stack, job.id),
            "resume_manifest": folders.read_manifest(store,
                                                     storage.checkpoint_key(job.id, 1, 4))}
    victim = owner_index(stack, job.id)
    assert victim is not None
    stack.kill_worker(victim, signal.SIGKILL)
    (gate / "hold-commit-8").unlink()
    (gate / "hold-12").unlink()
    done = wait_for_status(client, job.id, "succeeded", timeout=300)
    return {"job": done, "victim": victim, "half": half, **seen}


def objects_of(store: Store, folder: str) -> list[str]:
    return store.list(folder + "/")


# --------------------------------------------------------------------------- resume elsewhere
def test_a_job_killed_mid_commit_resumes_on_the_other_worker_from_s3(
        nodes: tuple[Stack, str], client: openai.OpenAI, resumed: dict[str, Any]) -> None:
    stack, store = nodes[0], nodes[0].store()
    job, half = resumed["job"], resumed["half"]
    rows = attempts(stack, job.id)
    survivor = 1 - resumed["victim"]
    events = list_all_events(client, job.id)
    removed = [e.data["removed"] for e in events if e.message.startswith("Removed checkpoint")]

    # When it was killed: checkpoint 4 committed and recorded; 8's files uploaded, no manifest.
    assert resumed["last_good"].last_good_step == 4
    assert f"{half}/adapter_model.safetensors" in resumed["uploaded"]
    assert f"{half}/{MANIFEST}" not in resumed["uploaded"]
    # Resumed by the other worker, from checkpoint 4, which it fetched from S3 into its cache.
    assert [r.outcome for r in rows] == ["lost", "succeeded"] and job.attempt == 2
    assert int(rows[1].worker.rsplit(":", 1)[1]) in stack.workers[survivor].child_pids()
    assert job.resumed_from_step == 4
    manifest = resumed["resume_manifest"]
    fetched = [p for p in (stack.cache_root / f"worker-{survivor}" / "entries").glob("folder-*")
               if (p / "optimizer.pt").is_file()]
    assert any(folders.sha256_of(p / "optimizer.pt") == manifest.files["optimizer.pt"].sha256
               for p in fetched)
    # What the killed attempt left half-written went, parts included, and was never listed.
    assert removed == [[half]]
    assert objects_of(store, half) == [] and store.abort_uploads(f"jobs/{job.id}/") == 0
    assert 8 in [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    # The nodes share no folder: nothing lies in a storage folder.
    assert not (stack.storage_dir / "jobs").exists()
    assert not (stack.storage_dir / "files").exists()


def test_the_resumed_adapter_equals_the_twins_bit_for_bit(
        nodes: tuple[Stack, str], twin: Any, resumed: dict[str, Any]) -> None:
    stack = nodes[0]
    job = resumed["job"]
    assert job.adapter_path.startswith("s3://") and twin.adapter_path.startswith("s3://")

    mine = adapter_tensors(stack.local_folder(job.adapter_path))
    theirs = adapter_tensors(stack.local_folder(twin.adapter_path))

    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# --------------------------------------------------------------------------- serving
def test_the_engine_serves_it_from_its_own_cache(nodes: tuple[Stack, str],
                                                 client: openai.OpenAI,
                                                 resumed: dict[str, Any]) -> None:
    stack, engine_url = nodes
    job = resumed["job"]
    weights = stack.store().get_bytes(
        f"{stack.store().key_of(job.adapter_path)}/adapter_model.safetensors")

    answer = client.completions.create(model=job.fine_tuned_model, prompt="#Person1#: Hi",
                                       max_tokens=8, temperature=0)
    stats = httpx.get(f"{engine_url}/health", timeout=30).json()
    cached = [p for p in (stack.cache_root / "engine" / "entries").glob("folder-*")
              if (p / "adapter_model.safetensors").is_file()
              and (p / "adapter_model.safetensors").read_bytes() == weights]

    assert answer.model == job.fine_tuned_model and answer.choices[0].text is not None
    assert cached, "the engine fetched the adapter into its own cache"
    if stats["backend"] == "vllm":
        assert stats["parity_checks"] >= 1 and stats["adapters_refused"] == 0


# --------------------------------------------------------------------------- the store away
def test_a_job_rides_out_the_store_stopped_for_ten_seconds(
        nodes: tuple[Stack, str], client: openai.OpenAI, store_server: SeaweedFS,
        file_id: str, tiny_model: Path, gate: Path, twin: Any, resumed: dict[str, Any]) -> None:
    """The store stops while the job commits checkpoint 8 (held until then), for 10 s. The
    commit retries with backoff and training goes on; the job succeeds on its first attempt.
    Meanwhile job status answers, and what needs the store answers 503: inference of an
    adapter the engine has never fetched (the twin's) included, the engine's 503 passed on."""
    stack = nodes[0]
    http = stack.http()
    generate = {"model": twin.fine_tuned_model, "prompt": "#Person1#: Hi", "max_tokens": 2,
                "temperature": 0}
    for waiting in gate.glob("waiting-*"):  # an earlier test's
        waiting.unlink()
    (gate / "hold-commit-8").touch()
    job = create_job(client, str(tiny_model), file_id, **{**NODE_JOB, "seed": 99})
    wait_until(lambda: (gate / "waiting-commit-8").exists(), timeout=300,
               what="the commit of checkpoint 8")
    store_server.stop()
    (gate / "hold-commit-8").unlink()
    answers: dict[str, list[int]] = {"status": [], "download": [], "upload": []}
    until = time.monotonic() + OUTAGE_SECONDS
    while time.monotonic() < until:
        answers["status"].append(http.get(f"/v1/fine_tuning/jobs/{job.id}").status_code)
        download = http.get(f"/v1/files/{file_id}/content")
        answers["download"].append(download.status_code)
        upload = http.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("x.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
        answers["upload"].append(upload.status_code)
        assert "Retry-After" in download.headers and "Retry-After" in upload.headers
        time.sleep(0.5)
    served_away = http.post("/v1/completions", json=generate)
    store_server.start()
    served_back = http.post("/v1/completions", json=generate)
    done = wait_for_status(client, job.id, "succeeded", timeout=300)
    worker_logs = "".join(p.log() for p in stack.workers)

    assert set(answers["status"]) == {200}
    assert set(answers["download"]) == set(answers["upload"]) == {503}
    assert served_away.status_code == 503, served_away.text
    assert served_away.json()["error"]["code"] == "storage_unavailable"
    assert served_away.headers["Retry-After"].isdigit()
    assert served_back.status_code == 200, served_back.text  # no restart needed
    assert f"committing checkpoint-8 of {job.id}" in worker_logs  # it retried
    assert done.attempt == 1
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert 8 in steps or min(steps) > 8  # committed (unless retention has deleted it since)
    assert folders.exists(stack.store(), stack.store().key_of(done.adapter_path))


# --------------------------------------------------------------------------- deletion
def test_deleting_the_model_leaves_no_object_of_it(nodes: tuple[Stack, str],
                                                   client: openai.OpenAI,
                                                   resumed: dict[str, Any]) -> None:
    store = nodes[0].store()
    job = resumed["job"]
    adapter = store.key_of(job.adapter_path)
    assert objects_of(store, adapter)

    assert client.models.delete(job.fine_tuned_model).deleted

    assert objects_of(store, adapter) == []
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=job.fine_tuned_model, prompt="Hi", max_tokens=2)


def test_the_bucket_holds_what_the_database_says(nodes: tuple[Stack, str],
                                                 client: openai.OpenAI,
                                                 resumed: dict[str, Any]) -> None:
    """Every object belongs to a file, a checkpoint or an adapter the database lists (or to a
    data set tokenized from a listed file's content), and each of those is whole."""
    stack, store = nodes[0], nodes[0].store()
    files = stack.sql("SELECT path, sha256 FROM files")
    checkpoints = [r.path for r in stack.sql("SELECT path FROM checkpoints WHERE NOT deleted")]
    adapters = [r.adapter_dir for r in stack.sql(
        "SELECT adapter_dir FROM jobs WHERE adapter_dir IS NOT NULL")]
    folders_listed = checkpoints + adapters
    prefixes = [f + "/" for f in folders_listed] + [
        storage.dataset_cache_prefix(f.sha256) for f in files]

    keys = store.list("")
    stray = [k for k in keys if k not in {f.path for f in files}
             and not k.startswith(tuple(prefixes))]

    assert stray == []
    assert all(f.path in keys for f in files)
    assert all(folders.exists(store, folder) for folder in folders_listed)
    assert store.abort_uploads("") == 0
