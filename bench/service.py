"""Service overhead: what the service adds around training, and what training costs the API.

- Overhead: one small job through ``lorafleet up`` (submit → succeeded, seen by polling the
  API) against the same job's training function called directly in a warm process
  (``load_tokenizer`` + ``prepare`` + ``train_adapter``, as the worker runs them).
- Queue latency: submit → the job running, and → its first training step reported, with an
  idle, warm worker.
- API: job-status GETs from 50 concurrent keep-alive clients while a job trains, against a
  bare FastAPI endpoint on the same server process (:mod:`bench.api_server`); the same GETs
  from a second server with the status cache off show what the cache buys.

``python -m bench.service --api-only`` runs the API measurement alone (about a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.recipe import Hyper

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """Processes of one service instance (own storage, SQLite database, embedded broker)."""

    storage: Path
    models_dir: Path
    port: int
    threads: int | None = None  # OMP_NUM_THREADS of the service's processes
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    key: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
        env.update(LORAFLEET_STORAGE_DIR=str(self.storage),
                   LORAFLEET_CACHE_DIR=str(self.storage / "cache"), LORAFLEET_PORT=str(self.port),
                   LORAFLEET_HOST="127.0.0.1", LORAFLEET_MODELS_DIR=str(self.models_dir))
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *commands: list[str]) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        logs = self.storage / "logs"
        logs.mkdir(exist_ok=True)
        self.key = subprocess.run(
            [sys.executable, "-m", "cli.main", "keys", "create", "--project", "bench"],
            env=self.env, cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        for i, cmd in enumerate(commands):
            out = (logs / f"proc-{i}.log").open("wb")
            self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=out,
                                               stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"the service did not come up; see {logs}")

    def add_api_server(self, **settings: str) -> int:
        """One more :mod:`bench.api_server` on this storage and database, with these settings
        on top of the stack's; returns its port once it answers."""
        port = _free_port()
        env = {**self.env, "LORAFLEET_PORT": str(port),
               **{f"LORAFLEET_{k.upper()}": v for k, v in settings.items()}}
        out = (self.storage / "logs" / f"proc-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "bench.api_server"], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return port
            time.sleep(0.3)
        raise SystemExit(f"the extra API server did not come up; see {out.name}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    # ---------------------------------------------------------------- API calls
    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, path: Path) -> str:
        with path.open("rb") as fh:
            r = httpx.post(f"{self.url}/v1/files", headers=self.headers, timeout=60,
                           data={"purpose": "fine-tune"}, files={"file": (path.name, fh)})
        r.raise_for_status()
        return str(r.json()["id"])

    def submit(self, body: dict[str, Any]) -> tuple[str, float]:
        t = time.perf_counter()
        r = httpx.post(f"{self.url}/v1/fine_tuning/jobs", headers=self.headers, json=body,
                       timeout=60)
        r.raise_for_status()
        return str(r.json()["id"]), t

    def job(self, job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/fine_tuning/jobs/{job_id}", headers=self.headers,
                      timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def wait(self, job_id: str, until: str = "succeeded", poll: float = 0.05,
             timeout: float = 1800) -> tuple[dict[str, Any], dict[str, float]]:
        """Poll until the job is terminal; returns it and when each milestone was first seen
        as ``perf_counter`` times: ``running`` (claimed), ``started`` (data and model loaded,
        the first step begins), ``first_step`` (step 1 reported), ``done``."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            now = time.perf_counter()
            if job["status"] != "queued" and job["status"] != "validating_files":
                seen.setdefault("running", now)
            if job.get("trainable_parameters") is not None:  # written when training starts
                seen.setdefault("started", now)
            if (job.get("progress") or {}).get("step", 0) >= 1:
                seen.setdefault("first_step", now)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                seen["done"] = now
                if job["status"] != until:
                    raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error')}")
                return job, seen
            time.sleep(poll)
        raise SystemExit(f"job {job_id} did not finish in {timeout} s")


@contextlib.contextmanager
def stack(work: Path, name: str, models_dir: Path, commands: list[list[str]],
          threads: int | None = None) -> Iterator[Stack]:
    st = Stack(work / f"service-{name}", models_dir, _free_port(), threads)
    shutil.rmtree(st.storage, ignore_errors=True)
    commands = [[a.replace("{port}", str(st.port)) for a in c] for c in commands]
    st.start(*commands)
    try:
        yield st
    finally:
        st.stop()


def job_body(model_dir: Path, file_id: str, hp: Hyper) -> dict[str, Any]:
    return {"model": str(model_dir), "training_file": file_id, "max_steps": hp.steps,
            "batch_size": hp.batch_size, "gradient_accumulation_steps": hp.grad_accum,
            "learning_rate": hp.learning_rate, "warmup": hp.warmup, "save_steps": hp.steps,
            "logging_steps": max(1, hp.steps // 4), "max_length": hp.max_length,
            "seed": hp.seed, "prompt_format": "dolly",
            "lora": {"r": hp.lora_r, "alpha": hp.lora_alpha, "dropout": hp.lora_dropout}}


def direct_run(model_dir: Path, train_file: Path, out: Path, hp: Hyper) -> float:
    """The job's work called directly, as the worker calls it; returns wall seconds."""
    from bench.throughput import lorafleet_spec
    from modelio.loading import load_tokenizer
    from shared.settings import get_settings
    from worker.preprocess import prepare
    from worker.training import train_adapter

    shutil.rmtree(out, ignore_errors=True)
    os.environ["LORAFLEET_STORAGE_DIR"] = str(out / "storage")
    os.environ["LORAFLEET_CACHE_DIR"] = str(out / "cache")
    get_settings.cache_clear()
    spec = lorafleet_spec(model_dir, hp)
    t = time.perf_counter()
    tokenizer = load_tokenizer(spec.model)
    data = prepare(spec, tokenizer, train_file, hashlib.sha256(train_file.read_bytes()).hexdigest())
    train_adapter(spec, tokenizer, data, out / "checkpoints", out / "adapter", device="auto")
    return time.perf_counter() - t


# --------------------------------------------------------------------------- load generator
async def _client(port: int, request: bytes, stop_at: float, lat: list[float],
                  errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if b" 200 " not in status:
                errors.append(1)
    finally:
        writer.close()


def hammer(port: int, path: str, headers: dict[str, str], clients: int,
           seconds: float) -> tuple[list[float], int, float]:
    """``clients`` keep-alive connections GET ``path`` back to back for ``seconds``; returns
    the latencies, the number of non-200 answers and the wall time."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode()
    lat: list[float] = []
    errors: list[int] = []

    async def main() -> float:
        t = time.perf_counter()
        stop_at = t + seconds
        await asyncio.gather(*(_client(port, request, stop_at, lat, errors)
                               for _ in range(clients)))
        return time.perf_counter() - t

    wall = asyncio.run(main())
    return lat, len(errors), wall


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


# --------------------------------------------------------------------------- the benchmark
@dataclass
class ServiceOutcome:
    job_desc: str
    service_s: list[float]
    direct_s: list[float]
    to_running: list[float]
    to_started: list[float]
    to_first_step: list[float]
    api: dict[str, dict[str, float]]
    clients: int
    api_seconds: float
    status_cache_seconds: float = 0.0  # TTL of the "job status" row's server

    @property
    def overhead(self) -> float:
        return min(self.service_s) / min(self.direct_s)


def run(model_dir: Path, train_file: Path, hp: Hyper, work: Path, *, repeats: int = 3,
        latency_jobs: int = 5, clients: int = 50, api_seconds: float = 5.0,
        log: Any = print, threads: int | None = None) -> ServiceOutcome:
    """All three service measurements. ``model_dir`` must sit in its own folder (it becomes
    the service's models folder). ``threads``: the workers' torch threads (match this
    process's, so the direct call and the job compute alike)."""
    up = [sys.executable, "-m", "cli.main", "up", "--no-engine"]
    models_dir = model_dir.parent
    warm_body = job_body(model_dir, "", Hyper(**{**hp.__dict__, "steps": 2}))
    service_s: list[float] = []
    direct_s: list[float] = []
    to_running: list[float] = []
    to_started: list[float] = []
    to_first: list[float] = []
    with stack(work, "up", models_dir, [up], threads) as st:
        file_id = st.upload(train_file)
        job_id, _ = st.submit({**warm_body, "training_file": file_id})
        st.wait(job_id)  # the worker is warm from here on
        # Warm this process the same way before timing the direct call.
        direct_run(model_dir, train_file, work / "direct-warm",
                   Hyper(**{**hp.__dict__, "steps": 2}))
        for rep in range(repeats):
            # A new upload each time (and a new storage folder for the direct run): both start
            # with a cold preprocessing cache.
            fid = st.upload(_variant(train_file, work, rep))
            job_id, t0 = st.submit(job_body(model_dir, fid, hp))
            _, seen = st.wait(job_id)
            service_s.append(seen["done"] - t0)
            direct_s.append(direct_run(model_dir, _variant(train_file, work, rep),
                                       work / f"direct-{rep}", hp))
            log(f"  job via `lorafleet up`: {service_s[-1]:.2f} s; called directly: "
                f"{direct_s[-1]:.2f} s")
        for _ in range(latency_jobs):
            time.sleep(1.0)  # an idle worker, waiting on the queue
            job_id, t0 = st.submit({**warm_body, "training_file": file_id})
            _, seen = st.wait(job_id, poll=0.01)
            to_running.append(seen["running"] - t0)
            to_started.append(seen["started"] - t0)
            to_first.append(seen["first_step"] - t0)
        log(f"  queue latency (medians of {latency_jobs}): running after "
            f"{statistics.median(to_running):.3f} s, training started after "
            f"{statistics.median(to_started):.3f} s, step 1 done after "
            f"{statistics.median(to_first):.3f} s")

    api = api_load(model_dir, train_file, hp, work, clients=clients, api_seconds=api_seconds,
                   log=log, threads=threads)
    desc = (f"{hp.steps} steps × batch {hp.batch_size}, max_length {hp.max_length}, one "
            "checkpoint")
    return ServiceOutcome(desc, service_s, direct_s, to_running, to_started, to_first, api,
                          clients, api_seconds, status_cache_seconds())


NO_CACHE = "job status (status cache off)"


def status_cache_seconds() -> float:
    """The status cache TTL the benchmark's main API server runs with (the default)."""
    from shared.settings import Settings

    return float(Settings.model_fields["status_cache_seconds"].default)


def api_load(model_dir: Path, train_file: Path, hp: Hyper, work: Path, *, clients: int = 50,
             api_seconds: float = 5.0, log: Any = print,
             threads: int | None = None) -> dict[str, dict[str, float]]:
    """Job-status GETs while a job trains, against the bare endpoints of the same server
    (default settings), and on a second server of the same service with the status cache off
    (:data:`NO_CACHE`); ``{endpoint: {rps, p50_ms, p99_ms, errors, requests}}``."""
    api_server = [sys.executable, "-m", "bench.api_server"]
    worker = [sys.executable, "-m", "cli.main", "worker"]
    api: dict[str, dict[str, float]] = {}
    with stack(work, "api", model_dir.parent, [api_server, worker], threads) as st:
        no_cache_port = st.add_api_server(status_cache_seconds="0")
        file_id = st.upload(train_file)
        long = job_body(model_dir, file_id, Hyper(**{**hp.__dict__, "steps": 100_000}))
        job_id, _ = st.submit({**long, "save_steps": 100_000})
        deadline = time.monotonic() + 300
        while (st.job(job_id).get("progress") or {}).get("step", 0) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("the API benchmark's job never started training")
            time.sleep(0.2)
        status = f"/v1/fine_tuning/jobs/{job_id}"
        targets = {"bare (async def)": (st.port, "/bench/bare", {}),
                   "bare (def, threadpool)": (st.port, "/bench/bare-sync", {}),
                   "job status": (st.port, status, st.headers),
                   NO_CACHE: (no_cache_port, status, st.headers)}
        samples: dict[str, list[tuple[list[float], int, float]]] = {k: [] for k in targets}
        for _ in range(2):  # alternate, so all see the same phases of training
            for name, (port, path, headers) in targets.items():
                samples[name].append(hammer(port, path, headers, clients, api_seconds))
        step = (st.job(job_id).get("progress") or {}).get("step", 0)
        httpx.post(f"{st.url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=st.headers,
                   timeout=30)
        for name, runs in samples.items():
            lat = [x for r in runs for x in r[0]]
            wall = sum(r[2] for r in runs)
            api[name] = {"rps": len(lat) / wall, "p50_ms": 1000 * _p(lat, 50),
                         "p99_ms": 1000 * _p(lat, 99), "errors": sum(r[1] for r in runs),
                         "requests": len(lat)}
            log(f"  {name:<30} {api[name]['rps']:8.1f} req/s, p50 {api[name]['p50_ms']:.1f} "
                f"ms, p99 {api[name]['p99_ms']:.1f} ms, {api[name]['errors']} errors")
        log(f"  (the job trained on throughout: step {step} at the end; status cache "
            f"{status_cache_seconds():g} s on the first server)")
    return api


def _variant(train_file: Path, work: Path, rep: int) -> Path:
    """The same examples under a new file hash (the first record's ``id`` gets a suffix), so
    nothing is served from an earlier run's preprocessing cache."""
    import json

    lines = train_file.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["id"] = f"{first.get('id', '')}-{rep}"
    dest = work / "data" / f"service-{rep}.jsonl"
    dest.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.service --api-only``: the API measurement alone, on the service
    benchmark's model and data (built in ``--work`` on first use)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.service", description=main.__doc__)
    parser.add_argument("--api-only", action="store_true", required=True,
                        help="measure the API under training load (the only mode here; the "
                        "whole service benchmark is `python -m bench --full --only service`)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0, help="per endpoint and round")
    parser.add_argument("--threads", type=int, default=1,
                        help="the worker's torch threads (as `python -m bench`)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "quick")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from bench.throughput import SERVICE_HYPER, build_service_model
    from bench.workload import select_examples

    hp = SERVICE_HYPER
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, _ = build_service_model(args.work)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    train_file, _ = select_examples(tok, "train", hp.examples, hp.max_length,
                                    args.work / "data" / "service-train.jsonl")
    print(f"API under training load: {args.clients} clients, {args.seconds:g} s per endpoint, "
          "two rounds", flush=True)
    api = api_load(model_dir, train_file, hp, args.work, clients=args.clients,
                   api_seconds=args.seconds, threads=args.threads or None,
                   log=lambda m: print(m, flush=True))
    for name in ("job status", NO_CACHE):
        print(f"{name} / bare async: {api[name]['rps'] / api['bare (async def)']['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
