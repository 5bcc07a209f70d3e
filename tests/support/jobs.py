"""Test data and job helpers that work with the ``openai`` SDK client or an ``httpx`` client."""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterable
from typing import Any

from shared.samples import dialogsum_path

TERMINAL = ("succeeded", "failed", "cancelled")

# Training settings that keep a job at a few seconds on a CPU with the tiny model. With the tiny
# tokenizer most DialogSum rows are 200-500 tokens; the few longer ones are dropped.
FAST_TRAINING: dict[str, Any] = {
    "max_steps": 8,
    "save_steps": 4,
    "logging_steps": 1,
    "max_length": 512,
    "batch_size": 4,
    "lora": {"r": 4, "alpha": 8},
}


def dialogsum_records(n: int, split: str = "train", offset: int = 0) -> list[dict[str, Any]]:
    """Records ``offset .. offset+n`` of a DialogSum split (see ``shared.samples``)."""
    with dialogsum_path(split).open(encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        return [json.loads(line) for line in itertools.islice(lines, offset, offset + n)]


def jsonl_bytes(records: Iterable[Any]) -> bytes:
    """Records as JSONL content."""
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def upload_bytes(client: Any, content: bytes, filename: str = "data.jsonl") -> Any:
    """Upload ``content`` with ``purpose=fine-tune``. Returns the SDK's ``FileObject``, or the
    ``httpx.Response`` for an ``httpx`` client (which does not raise on errors)."""
    if hasattr(client, "files"):
        return client.files.create(file=(filename, io.BytesIO(content)), purpose="fine-tune")
    return client.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": (filename, content, "application/jsonl")})


def upload_dialogsum(client: Any, n: int, split: str = "train", offset: int = 0) -> Any:
    """Upload the first ``n`` records of a DialogSum split (after ``offset``)."""
    return upload_bytes(client, jsonl_bytes(dialogsum_records(n, split, offset)),
                        f"dialogsum-{split}-{n}.jsonl")


def create_job(client: Any, model: str, training_file: str, **fields: Any) -> Any:
    """Create a job with :data:`FAST_TRAINING` (overridden by ``fields``). OpenAI's own fields
    go as arguments, lorafleet's extensions in ``extra_body``."""
    openai_fields = {"validation_file", "hyperparameters", "method", "suffix", "seed",
                     "metadata", "integrations"}
    body = {**FAST_TRAINING, **fields}
    if hasattr(client, "fine_tuning"):
        own = {k: body.pop(k) for k in list(body) if k in openai_fields}
        return client.fine_tuning.jobs.create(model=model, training_file=training_file,
                                              extra_body=body, **own)
    r = client.post("/v1/fine_tuning/jobs",
                    json={"model": model, "training_file": training_file, **body})
    r.raise_for_status()
    return r.json()


def _status(job: Any) -> str:
    return job["status"] if isinstance(job, dict) else job.status


def get_job(client: Any, job_id: str) -> Any:
    """The job as the SDK's ``FineTuningJob`` (or a dict for an ``httpx`` client)."""
    if hasattr(client, "fine_tuning"):
        return client.fine_tuning.jobs.retrieve(job_id)
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def wait_for_status(
    client: Any,
    job_id: str,
    statuses: str | Iterable[str],
    timeout: float = 120.0,
    interval: float = 0.2,
) -> Any:
    """Poll until the job's status is one of ``statuses``; returns the job.

    Raises:
        AssertionError: the timeout passed, or the job ended in a status not asked for (then
            its error is in the message).
    """
    wanted = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.monotonic() + timeout
    job = get_job(client, job_id)
    while _status(job) not in wanted:
        if _status(job) in TERMINAL:
            raise AssertionError(f"job {job_id} ended {_status(job)}, expected "
                                 f"{sorted(wanted)}: {_describe(job)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {_status(job)} after {timeout}s, "
                                 f"expected {sorted(wanted)}: {_describe(job)}")
        time.sleep(interval)
        job = get_job(client, job_id)
    return job


def _describe(job: Any) -> str:
    data = job if isinstance(job, dict) else job.model_dump()
    return json.dumps({k: data.get(k) for k in ("status", "error", "progress", "attempt")},
                      default=str)


def list_all_events(client: Any, job_id: str) -> list[Any]:
    """Every event of a job, oldest first (the SDK pages through ``after``)."""
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))
    return events[::-1]
