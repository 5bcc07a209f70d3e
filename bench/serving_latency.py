"""Serving benchmark, part 3: API latency while the engine is saturated.

Real processes (``lorafleet api`` and ``lorafleet serve``) on a throw-away storage folder;
succeeded jobs for the benchmark's adapters go straight into the database. A client polls
``GET /v1/fine_tuning/jobs/{id}`` every 20 ms, in windows that alternate between an idle
engine and one kept saturated by clients sending completions through the API (from a
separate process, so that they do not slow the poller down). Run by ``bench/serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


def _insert_jobs(storage: Path, model: Path, adapters: list[Path]) -> tuple[list[str], str]:
    """Succeeded jobs for the adapters and one queued job to poll, straight into the DB."""
    from sqlalchemy.orm import Session

    from shared.db import make_engine
    from shared.ids import new_id, now
    from shared.models import Job
    from shared.schemas import LoraSpec, TrainingSpec
    from shared.templates import PromptFormat

    spec = TrainingSpec(model=str(model), training_file="file-bench", lora=LoraSpec(),
                        prompt_format=PromptFormat(), max_length=1024, max_steps=1, n_epochs=1,
                        batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4,
                        warmup=0, save_steps=1, logging_steps=1, train_on_inputs=False,
                        packing=False, seed=0).model_dump(mode="json")
    names = []
    db = make_engine(f"sqlite:///{storage / 'lorafleet.db'}")
    with Session(db) as session:
        for i, path in enumerate(adapters):
            job_id = new_id("ftjob")
            dest = storage / "jobs" / job_id / "adapter"
            shutil.copytree(path, dest)
            name = f"ft:{model.name}:bench{i}:{job_id}"
            session.add(Job(id=job_id, project="bench", created_at=now(), finished_at=now(),
                            model=str(model), status="succeeded", training_file="file-bench",
                            spec=spec, seed=0, fine_tuned_model=name,
                            adapter_dir=f"jobs/{job_id}/adapter"))
            names.append(name)
        polled = new_id("ftjob")
        session.add(Job(id=polled, project="bench", created_at=now(), model=str(model),
                        status="queued", training_file="file-bench", spec=spec, seed=0))
        session.commit()
    db.dispose()
    return names, polled


def _load(url: str, key: str, models: list[str], concurrency: int, max_tokens: int,
          go: Any, stop: Any, sent: Any) -> None:
    """A separate process: ``concurrency`` clients sending completions while ``go`` is set,
    until ``stop``."""
    import httpx

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while not stop.is_set():
            if not go.is_set():
                await asyncio.sleep(0.01)
                continue
            r = await http.post("/v1/completions", json={
                "model": models[(i + n) % len(models)], "prompt": f"Hello number {n}",
                "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            n += 1
            with sent.get_lock():
                sent.value += 1

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            await asyncio.gather(*(client(i, http) for i in range(concurrency)))

    asyncio.run(main())


def _poll(http: Any, job_id: str, seconds: float) -> list[float]:
    """``GET`` the job every 20 ms for ``seconds`` (a client watching its job); latencies in
    milliseconds."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        http.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)
    return times


def _idle_and_busy(http: Any, url: str, key: str, names: list[str], polled: str,
                   engine_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Polls in alternating windows: engine idle, then kept saturated by ``--requests``
    clients sending completions through the API. Alternating keeps slow changes in the rest
    of the machine's load out of the comparison."""
    import httpx

    def engine() -> dict[str, Any]:
        return httpx.get(engine_url, timeout=30).json()

    ctx = multiprocessing.get_context("spawn")
    go, stop, sent = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    loader = ctx.Process(target=_load, daemon=True,
                         args=(url, key, names, args.requests, args.max_tokens, go, stop, sent))
    loader.start()
    idle: list[float] = []
    busy: list[float] = []
    batches = rows = 0
    window = args.poll_seconds / args.windows
    try:
        for _ in range(args.windows):
            go.clear()
            while (state := engine())["busy"] or state["queued"]:  # drain
                time.sleep(0.05)
            idle += _poll(http, polled, window)
            go.set()
            while not engine()["busy"]:
                time.sleep(0.01)
            before = engine()
            busy += _poll(http, polled, window)
            after = engine()
            batches += after["batches"] - before["batches"]
            rows += after["rows"] - before["rows"]
    finally:
        stop.set()
        loader.join(timeout=120)
        if loader.is_alive():
            loader.terminate()
    return {
        "idle_polls": len(idle), "busy_polls": len(busy),
        "idle_p50_ms": round(percentile(idle, 50), 2),
        "idle_p99_ms": round(percentile(idle, 99), 2),
        "busy_p50_ms": round(percentile(busy, 50), 2),
        "busy_p99_ms": round(percentile(busy, 99), 2),
        "p99_ratio": round(percentile(busy, 99) / percentile(idle, 99), 2),
        "engine_batches": batches, "rows_per_batch": round(rows / batches, 1) if batches else 0,
        "completions": sent.value,
    }


def bench_status_poll(model: Path, adapters: list[Path], args: argparse.Namespace,
                      root: Path) -> dict[str, Any]:
    import httpx

    storage = root / "storage"
    api_port, engine_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update({
        "LORAFLEET_STORAGE_DIR": str(storage), "LORAFLEET_PORT": str(api_port),
        "LORAFLEET_ENGINE_PORT": str(engine_port),
        "LORAFLEET_ENGINE_URL": f"http://127.0.0.1:{engine_port}",
        "LORAFLEET_ENGINE_DEVICE": "cpu", "LORAFLEET_ENGINE_TORCH_THREADS": str(args.threads),
        "LORAFLEET_MAX_BATCH_SIZE": str(args.requests), "LORAFLEET_MAX_QUEUED_REQUESTS": "10000",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
    })
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    key = subprocess.run([*cli, "keys", "create", "--project", "bench"], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    names, polled = _insert_jobs(storage, model, adapters)
    url, engine_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{engine_port}/health"
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(root / f"{cmd}.log", "ab")  # noqa: SIM115 - the child writes it
        proc = subprocess.Popen([*cli, cmd], env={**env, **extra}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)

    results: dict[str, Any] = {"load_clients": args.requests, "windows": args.windows,
                               "load_average": round(os.getloadavg()[0], 2)}
    try:
        _wait(f"{url}/health", start("api", {}))
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            for nice in args.engine_nice:
                engine = start("serve", {"LORAFLEET_ENGINE_NICE": str(nice)})
                _wait(engine_url, engine)
                for name in names:  # warm-up: base model and every adapter loaded
                    http.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                       "max_tokens": 2}).raise_for_status()
                _poll(http, polled, 1)
                results[f"nice{nice}"] = _idle_and_busy(http, url, key, names, polled,
                                                        engine_url, args)
                stop(engine)
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)
    return results
