"""Serving benchmark, the live side: real processes, and clients that time them over HTTP.

:class:`LiveService` runs ``lorafleet api`` on a throw-away storage folder, with succeeded jobs
for the benchmark's adapters inserted straight into its database (plus one queued job whose
status is polled), and starts ``lorafleet serve`` with one backend at a time
(``LORAFLEET_ENGINE_BACKEND``) on the port the API forwards to.

:func:`run_calls` sends streaming completions (``stream: true``) through the API, all at once
or one at a time, and times each one: time to the first chunk with text (TTFT) and to the end
of the stream, with the completion tokens from the usage chunk. :func:`run_interleaved` sends a
short request while a long batch is generating. Used by ``bench/serving.py`` and
``bench/serving_polls.py``; the serving tests stop their engine with :func:`stop_engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

Call = tuple[str, str, int]  # model, prompt, max_tokens
CONSOLE_SETTLE_SECONDS = 1.5


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (of 32 values, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120,
          key: str | None = None) -> None:
    """Until ``url`` answers 200 (with ``key`` in its JSON, if given)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200 and (key is None or key in answer.json()):
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


def _insert_jobs(storage: Path, model: Path, adapters: list[Path],
                 prompt_format: dict[str, Any] | None = None) -> tuple[list[str], str]:
    """Succeeded jobs for the adapters (trained in ``prompt_format``, default dolly) and one
    queued job to poll, straight into the DB."""
    from sqlalchemy.orm import Session

    from shared.db import make_engine
    from shared.ids import new_id, now
    from shared.models import Job
    from shared.schemas import LoraSpec, TrainingSpec
    from shared.templates import PromptFormat

    spec = TrainingSpec(model=str(model), training_file="file-bench", lora=LoraSpec(),
                        prompt_format=PromptFormat.model_validate(prompt_format or {}),
                        max_length=1024, max_steps=1, n_epochs=1, batch_size=1,
                        gradient_accumulation_steps=1, learning_rate=1e-4,
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


# --------------------------------------------------------------------------- processes
def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    """Stop a ``lorafleet serve`` process; with it, the vLLM servers it started (whatever
    becomes of it). The serving tests stop their engine with this too."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)  # it stops its vLLM servers first
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    for child in children:  # vLLM servers run in sessions of their own
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def max_lora_rank(cmdlines: list[list[str]]) -> int | None:
    """The ``--max-lora-rank`` a vLLM server was started with, from the command lines of the
    engine's child processes (None: none of them has it)."""
    for cmd in cmdlines:
        for i, word in enumerate(cmd):
            if word == "--max-lora-rank" and i + 1 < len(cmd):
                return int(cmd[i + 1])
            if word.startswith("--max-lora-rank="):
                return int(word.split("=", 1)[1])
    return None


class LiveService:
    """``lorafleet api`` and, one backend at a time, ``lorafleet serve``, as real processes.

    Args:
        root: work folder (storage, database, logs).
        model: the base model folder.
        adapters: adapter folders; each becomes a succeeded job's fine-tuned model.
        threads: torch threads of the built-in engine.
        max_batch: ``LORAFLEET_MAX_BATCH_SIZE`` of the built-in engine.
        prompt_format: the adapters' prompt format (``shared.templates.PromptFormat``'s
            fields; default: dolly).
    """

    def __init__(self, root: Path, model: Path, adapters: list[Path], *, threads: int,
                 max_batch: int, prompt_format: dict[str, Any] | None = None):
        self.root, self.model, self.adapters = root, model, adapters
        self.prompt_format = prompt_format
        self.storage = root / "storage"
        api_port = _free_port()
        engine_port = _free_port()
        while engine_port == api_port:
            engine_port = _free_port()
        self.url = f"http://127.0.0.1:{api_port}"
        self.engine_url = f"http://127.0.0.1:{engine_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
        self.env.update({
            "LORAFLEET_STORAGE_DIR": str(self.storage), "LORAFLEET_PORT": str(api_port),
            "LORAFLEET_CACHE_DIR": str(self.storage / "cache"),
            "LORAFLEET_ENGINE_PORT": str(engine_port), "LORAFLEET_ENGINE_URL": self.engine_url,
            "LORAFLEET_ENGINE_DEVICE": "cpu", "LORAFLEET_ENGINE_TORCH_THREADS": str(threads),
            "LORAFLEET_MAX_BATCH_SIZE": str(max_batch),
            "LORAFLEET_MAX_QUEUED_REQUESTS": "10000", "LORAFLEET_VLLM_PYTHON": str(VLLM_PYTHON),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
        })
        self.cli = [sys.executable, "-m", "cli.main"]
        self.key = ""
        self.names: list[str] = []
        self.polled = ""
        self.api: subprocess.Popen[bytes] | None = None
        self.engine: subprocess.Popen[bytes] | None = None
        self.backend = ""

    @property
    def base(self) -> str:
        """The base model's name in the API (its path)."""
        return str(self.model)

    def _start(self, cmd: str, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{cmd}.log"
        with log.open("ab") as out:
            # A session of its own: stopping it reaches the vLLM servers it started.
            proc = subprocess.Popen([*self.cli, cmd], env={**self.env, **extra}, cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def start(self) -> None:
        subprocess.run([*self.cli, "migrate"], env=self.env, check=True, capture_output=True,
                       cwd=ROOT)
        self.key = subprocess.run(
            [*self.cli, "keys", "create", "--project", "bench"], env=self.env, check=True,
            capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        self.names, self.polled = _insert_jobs(self.storage, self.model, self.adapters,
                                               self.prompt_format)
        self.api, log = self._start("api", {})
        _wait(f"{self.url}/health", self.api, log)

    def start_engine(self, settings: dict[str, str]) -> None:
        """``lorafleet serve`` with ``settings`` (``LORAFLEET_ENGINE_BACKEND`` and others);
        returns once it answers (a vLLM server starts on the first request, see
        :meth:`warm_up`)."""
        self.stop_engine()
        self.engine, log = self._start("serve", settings)
        self.backend = settings["LORAFLEET_ENGINE_BACKEND"]
        _wait(f"{self.engine_url}/health", self.engine, log, key="base_models")

    def stop_engine(self) -> None:
        """Stop the engine and, with it, the vLLM servers it started."""
        proc, self.engine = self.engine, None
        if proc is not None:
            stop_engine(proc)

    def close(self) -> None:
        self.stop_engine()
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.api.wait(timeout=20)
            if self.api.poll() is None:
                self.api.kill()

    def __enter__(self) -> LiveService:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _engine_children(self) -> list[list[str]]:
        """The command lines of the engine's child processes (its vLLM servers)."""
        import psutil

        if self.engine is None:
            return []
        out = []
        for child in psutil.Process(self.engine.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out.append(child.cmdline())
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far, by role: ``api``, ``engine`` (``lorafleet
        serve``), ``vllm_server`` (the vLLM servers it started: their HTTP front ends),
        ``vllm_core`` (their engine cores and other children) and ``clients`` (this process,
        whose event loop runs the benchmark's clients). A process that exited is not counted."""
        import psutil

        out = {"api": 0.0, "engine": 0.0, "vllm_server": 0.0, "vllm_core": 0.0,
               "clients": time.process_time()}

        def used(pid: int | psutil.Process) -> float:
            with contextlib.suppress(psutil.Error):
                proc = pid if isinstance(pid, psutil.Process) else psutil.Process(pid)
                t = proc.cpu_times()
                return float(t.user + t.system)
            return 0.0

        if self.api is not None:
            out["api"] = used(self.api.pid)
        if self.engine is not None:
            out["engine"] = used(self.engine.pid)
            with contextlib.suppress(psutil.Error):
                for server in psutil.Process(self.engine.pid).children():
                    out["vllm_server"] += used(server)
                    with contextlib.suppress(psutil.Error):
                        for child in server.children(recursive=True):
                            out["vllm_core"] += used(child)
        return out

    def engine_stats(self) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(f"{self.engine_url}/health", timeout=30).json())

    def warm_up(self) -> dict[str, Any]:
        """The base model loaded (on vLLM: its server started) and every adapter used once (on
        vLLM: loaded and its parity probe replayed), so that nothing of it is timed later.

        Raises:
            RuntimeError: a request failed, or vLLM did not check every adapter's probe.
        """
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=900) as http:
            start = time.perf_counter()
            first = 0.0
            for name in [self.base, *self.names]:
                answer = http.post("/v1/completions", json={
                    "model": name, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
                if answer.status_code != 200:
                    raise RuntimeError(f"warm-up of {name} on {self.backend}: "
                                       f"{answer.status_code} {answer.text[:2000]}")
                if name == self.base:
                    first = time.perf_counter() - start
        stats = self.engine_stats()
        out: dict[str, Any] = {"first_request_seconds": round(first, 1),
                               "seconds": round(time.perf_counter() - start, 1),
                               "backend": stats.get("backend")}
        if self.backend == "vllm":
            server = stats["base_models"][self.base]
            out.update(parity_checks=stats["parity_checks"],
                       adapters_refused=stats["adapters_refused"],
                       adapters_loaded=server["adapters"], vllm_url=server["url"],
                       lora_ops=server.get("lora_ops"))
            if stats["parity_checks"] < len(self.names) or stats["adapters_refused"]:
                raise RuntimeError(f"vLLM checked {stats['parity_checks']} parity probes and "
                                   f"refused {stats['adapters_refused']} of "
                                   f"{len(self.names)} adapters")
            rank = max_lora_rank(self._engine_children())
            if rank is not None:
                out["max_lora_rank"] = rank
            with contextlib.suppress(httpx.HTTPError, ValueError):
                out["vllm_version"] = httpx.get(f"{server['url']}/version",
                                                timeout=10).json()["version"]
        return out


# --------------------------------------------------------------------------- streaming clients
@dataclass
class Sample:
    """One streamed completion; times are ``time.perf_counter()`` seconds."""

    model: str
    sent: float = 0.0
    first: float | None = None  # the first chunk with text
    done: float = 0.0
    tokens: int = 0
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return (self.first if self.first is not None else self.done) - self.sent

    @property
    def latency(self) -> float:
        return self.done - self.sent


def _client(url: str, key: str) -> Any:
    import httpx

    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                             timeout=900, limits=httpx.Limits(max_connections=256))


async def _stream(http: Any, call: Call, sample: Sample) -> Sample:
    model, prompt, max_tokens = call
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "raw_prompt": True, "stream": True, "stream_options": {"include_usage": True}}
    sample.sent = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as answer:
        if answer.status_code != 200:
            await answer.aread()
            raise RuntimeError(f"{model}: {answer.status_code} {answer.text[:500]}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text") and sample.first is None:
                    sample.first = time.perf_counter()
                sample.finish_reason = choice.get("finish_reason") or sample.finish_reason
            if chunk.get("usage"):
                sample.tokens = int(chunk["usage"]["completion_tokens"])
    sample.done = time.perf_counter()
    return sample


def finish_reasons(samples: list[Sample]) -> dict[str, int]:
    """How many samples ended for each reason ('length': all ``max_tokens`` generated)."""
    reasons: dict[str, int] = {}
    for s in samples:
        reasons[str(s.finish_reason)] = reasons.get(str(s.finish_reason), 0) + 1
    return reasons


@dataclass
class Run:
    samples: list[Sample]
    wall: float

    def summary(self) -> dict[str, Any]:
        tokens = sum(s.tokens for s in self.samples)
        ttft = [s.ttft * 1000 for s in self.samples]
        latency = [s.latency * 1000 for s in self.samples]
        return {"requests": len(self.samples), "wall_s": round(self.wall, 3),
                "tokens": tokens, "tokens_per_s": round(tokens / self.wall, 1),
                "ttft_p50_ms": round(percentile(ttft, 50), 1),
                "ttft_p99_ms": round(percentile(ttft, 99), 1),
                "latency_p50_ms": round(percentile(latency, 50), 1),
                "latency_p99_ms": round(percentile(latency, 99), 1),
                "finish_reasons": finish_reasons(self.samples)}


def run_calls(url: str, key: str, calls: list[Call], *, concurrent: bool) -> Run:
    """Send ``calls`` as streaming completions, all at once or each after the previous one
    ended; the wall time runs from the first send to the last answer's end."""

    async def main() -> Run:
        async with _client(url, key) as http:
            start = time.perf_counter()
            if concurrent:
                samples = list(await asyncio.gather(
                    *(_stream(http, c, Sample(c[0])) for c in calls)))
            else:
                samples = [await _stream(http, c, Sample(c[0])) for c in calls]
            return Run(samples, time.perf_counter() - start)

    return asyncio.run(main())


@dataclass
class Interleaved:
    """A long batch and short requests sent one after the other while it generated."""

    long: list[Sample] = field(default_factory=list)
    shorts: list[Sample] = field(default_factory=list)
    short_sent_after: float = 0.0  # seconds after the batch was sent, the first short one

    def summary(self) -> dict[str, Any]:
        tokens = [s.tokens for s in self.long]
        start = min(s.sent for s in self.long)
        long_done = [s.done for s in self.long]
        last = max(s.done for s in self.shorts)
        return {
            "long_requests": len(self.long), "long_tokens_min": min(tokens),
            "long_tokens_mean": round(sum(tokens) / len(tokens), 1),
            "long_finish_reasons": finish_reasons(self.long),
            "batch_seconds": round(max(long_done) - start, 3),
            "short_sent_after_s": round(self.short_sent_after, 3),
            "short_tokens": self.shorts[0].tokens,
            "short_ttft_ms": round(statistics.median(s.ttft for s in self.shorts) * 1000, 1),
            "short_ttfts_ms": [round(s.ttft * 1000, 1) for s in self.shorts],
            "short_latency_ms": round(statistics.median(s.latency for s in self.shorts) * 1000,
                                      1),
            "short_done_after_s": round(last - start, 3),
            "short_before_batch_end": last < max(long_done),
            "short_before_first_long": last < min(long_done),
            "long_still_generating_when_short_done": sum(d > last for d in long_done),
        }


def run_interleaved(url: str, key: str, long: list[Call], short: Call,
                    delay: float = 0.5, shorts: int = 1) -> Interleaved:
    """Send the ``long`` calls at once; once every one of them has streamed its first text
    (the whole batch is generating) and ``delay`` more seconds, send ``short``; ``shorts``
    times in all, each ``delay`` after the previous one ended, as long as the batch runs."""

    async def main() -> Interleaved:
        async with _client(url, key) as http:
            out = Interleaved(long=[Sample(c[0]) for c in long])
            start = time.perf_counter()
            tasks = [asyncio.ensure_future(_stream(http, c, s))
                     for c, s in zip(long, out.long, strict=True)]
            while not all(s.first for s in out.long):
                if any(t.done() for t in tasks):  # one ended (or failed) before all began
                    break
                await asyncio.sleep(0.005)
            for n in range(shorts):
                await asyncio.sleep(delay)
                if n and any(t.done() for t in tasks):  # only while the whole batch runs
                    break
                if not n:
                    out.short_sent_after = time.perf_counter() - start
                out.shorts.append(await _stream(http, short, Sample(short[0])))
            await asyncio.gather(*tasks)
            return out

    return asyncio.run(main())
