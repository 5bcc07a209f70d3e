"""``lorafleet jobs watch``: a live progress bar for one fine-tuning job, over the REST API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from shared.lifecycle import TERMINAL, JobStatus
from shared.settings import get_settings


def _base_url(arg: str | None) -> str:
    s = get_settings()
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return (arg or f"http://{host}:{s.port}/v1").rstrip("/")


def watch_job(base_url: str, job_id: str, api_key: str | None = None,
              interval: float = 0.5) -> dict[str, Any] | None:
    """Show a live progress bar until the job ends; returns the final job (``None`` on an API
    error, which is printed to stderr)."""
    import httpx
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    url = f"{base_url.rstrip('/')}/fine_tuning/jobs/{job_id}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=10, headers=headers) as client, Progress(
        TextColumn("[bold]{task.fields[status]:>9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("eta"), TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("train", total=None, status="...", loss="-")
        while True:
            r = client.get(url)
            if r.status_code != 200:
                bar.stop()
                print(f"error {r.status_code}: {r.text}", file=sys.stderr)
                return None
            job: dict[str, Any] = r.json()
            p = job.get("progress") or {}
            loss = p.get("loss")
            bar.update(task, total=p.get("total_steps"), completed=p.get("step", 0),
                       status=job["status"], loss=f"{loss:.4f}" if loss is not None else "-")
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)


def report_job(job: dict[str, Any]) -> int:
    """Print a finished job's result; 0 if it succeeded, 2 otherwise."""
    if job["status"] == JobStatus.SUCCEEDED:
        print(f"succeeded: {job['fine_tuned_model']}")
        print(f"adapter: {job['adapter_path']}")
        return 0
    err = (job.get("error") or {}).get("message", "")
    print(f"{job['status']}: {err}", file=sys.stderr)
    return 2


def cmd_watch(args: argparse.Namespace) -> int:
    """``lorafleet jobs watch JOB_ID``: 0 if the job succeeded, 2 if it did not, 1 on an API
    error. The key comes from ``LORAFLEET_API_KEY`` (or ``OPENAI_API_KEY``)."""
    key = os.environ.get("LORAFLEET_API_KEY") or os.environ.get("OPENAI_API_KEY")
    job = watch_job(_base_url(args.base_url), args.job_id, key, args.interval)
    return 1 if job is None else report_job(job)
