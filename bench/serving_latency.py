"""Serving benchmark, the live side: real processes, and clients that time them over HTTP.

:class:`LiveService` runs ``lorafleet api`` on a throw-away storage folder, with succeeded jobs
for the benchmark's adapters inserted straight into its database (plus one queued job whose
status is polled), and starts ``lorafleet serve`` with one backend at a time
(``LORAFLEET_ENGINE_BACKEND``) on the port the API forwards to.

:func:`run_calls` sends streaming completions (``stream: true``) through the API, all at once
or one at a time, and times each one: time to the first chunk with text (TTFT) and to the end
of the stream, with the completion tokens from the usage chunk. :func:`run_interleaved` sends a
short request while a long batch is generating. :func:`status_poll` polls a job's status in
windows that alternate between an idle engine and one kept saturated by clients sending
completions (from a separate process, so that they do not slow the poller down), optionally
with the web console open on that job in headless Chromium. Used by ``bench/serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
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


# --------------------------------------------------------------------------- processes
class LiveService:
    """``lorafleet api`` and, one backend at a time, ``lorafleet serve``, as real processes.

    Args:
        root: work folder (storage, database, logs).
        model: the base model folder.
        adapters: adapter folders; each becomes a succeeded job's fine-tuned model.
        threads: torch threads of the built-in engine.
        max_batch: ``LORAFLEET_MAX_BATCH_SIZE`` of the built-in engine.
    """

    def __init__(self, root: Path, model: Path, adapters: list[Path], *, threads: int,
                 max_batch: int):
        self.root, self.model, self.adapters = root, model, adapters
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
        self.names, self.polled = _insert_jobs(self.storage, self.model, self.adapters)
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
        import psutil

        proc, self.engine = self.engine, None
        if proc is None:
            return
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
                       adapters_loaded=server["adapters"], vllm_url=server["url"])
            if stats["parity_checks"] < len(self.names) or stats["adapters_refused"]:
                raise RuntimeError(f"vLLM checked {stats['parity_checks']} parity probes and "
                                   f"refused {stats['adapters_refused']} of "
                                   f"{len(self.names)} adapters")
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
    """A long batch and one short request sent while it generated."""

    long: list[Sample] = field(default_factory=list)
    short: Sample = field(default_factory=lambda: Sample(""))
    short_sent_after: float = 0.0  # seconds after the batch was sent

    def summary(self) -> dict[str, Any]:
        tokens = [s.tokens for s in self.long]
        start = min(s.sent for s in self.long)
        long_done = [s.done for s in self.long]
        return {
            "long_requests": len(self.long), "long_tokens_min": min(tokens),
            "long_tokens_mean": round(sum(tokens) / len(tokens), 1),
            "long_finish_reasons": finish_reasons(self.long),
            "batch_seconds": round(max(long_done) - start, 3),
            "short_sent_after_s": round(self.short_sent_after, 3),
            "short_tokens": self.short.tokens,
            "short_ttft_ms": round(self.short.ttft * 1000, 1),
            "short_latency_ms": round(self.short.latency * 1000, 1),
            "short_done_after_s": round(self.short.done - start, 3),
            "short_before_batch_end": self.short.done < max(long_done),
            "short_before_first_long": self.short.done < min(long_done),
            "long_still_generating_when_short_done": sum(d > self.short.done
                                                         for d in long_done),
        }


def run_interleaved(url: str, key: str, long: list[Call], short: Call,
                    delay: float = 0.5) -> Interleaved:
    """Send the ``long`` calls at once; once every one of them has streamed its first text
    (the whole batch is generating) and ``delay`` more seconds, send ``short``."""

    async def main() -> Interleaved:
        async with _client(url, key) as http:
            out = Interleaved(long=[Sample(c[0]) for c in long], short=Sample(short[0]))
            start = time.perf_counter()
            tasks = [asyncio.ensure_future(_stream(http, c, s))
                     for c, s in zip(long, out.long, strict=True)]
            while not all(s.first for s in out.long):
                if any(t.done() for t in tasks):  # one ended (or failed) before all began
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(delay)
            out.short_sent_after = time.perf_counter() - start
            await asyncio.gather(_stream(http, short, out.short), *tasks)
            return out

    return asyncio.run(main())


# --------------------------------------------------------------------------- status polls
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
                                     limits=httpx.Limits(max_connections=256),
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


def chromium_path() -> str | None:
    """The system's Chromium (as the console's browser tests find it)."""
    return (os.environ.get("LORAFLEET_TEST_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))


class ConsoleTab:
    """The web console in headless Chromium, signed in with the benchmark's key; open on a
    job's page (:meth:`show`, the console then polls it at its own bounded interval) or on
    a blank page (:meth:`hide`)."""

    def __init__(self, url: str, key: str, chromium: str):
        from playwright.sync_api import sync_playwright

        self.url = url
        self._playwright = sync_playwright().start()
        try:
            # --no-sandbox: run as root, Chromium's sandbox refuses to start.
            self.browser = self._playwright.chromium.launch(executable_path=chromium,
                                                            args=["--no-sandbox"])
            self.page = self.browser.new_page(viewport={"width": 1280, "height": 900})
            self.page.goto(f"{url}/console")
            self.page.get_by_label("API key").fill(key)
            self.page.get_by_role("button", name="Sign in").click()
            self.page.get_by_role("heading", name="Fine-tuning jobs", exact=True).wait_for()
        except BaseException:
            self.close()
            raise

    def _fetches(self, part: str) -> int:
        return int(self.page.evaluate(
            "(part) => performance.getEntriesByType('resource')"
            ".filter(e => e.initiatorType === 'fetch' && e.name.includes(part)).length",
            part))

    def show(self, job_id: str) -> None:
        """Open the job's page; returns once the page has read the job."""
        self.page.goto(f"{self.url}/console#/jobs/{job_id}")
        self.page.evaluate("performance.setResourceTimingBufferSize(5000)")
        self.page.wait_for_function(
            "(id) => performance.getEntriesByType('resource')"
            ".some(e => e.initiatorType === 'fetch' && e.name.includes(id))", arg=job_id)

    def hide(self) -> int:
        """Leave the job's page for a blank one; returns the API requests the page made."""
        count = self._fetches("/v1/")
        self.page.goto("about:blank")
        return count

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.browser.close()
        with contextlib.suppress(Exception):
            self._playwright.stop()


def status_poll(service: LiveService, args: argparse.Namespace, console: bool
                ) -> dict[str, Any]:
    """p50/p99 of ``GET /v1/fine_tuning/jobs/{id}`` with the engine idle and saturated by
    ``args.requests`` clients sending completions through the API, in ``args.windows``
    alternating windows (slow changes in the machine's load stay out of the comparison);
    with ``console``, each idle and saturated pair of windows is followed by another pair
    with the web console open on the job's page (opened before, closed after the pair).
    """
    import httpx

    chromium = chromium_path() if console else None
    results: dict[str, Any] = {"load_clients": args.requests, "windows": args.windows,
                               "window_seconds": round(args.poll_seconds / args.windows, 2),
                               "load_average": round(os.getloadavg()[0], 2)}
    tab: ConsoleTab | None = None
    if not console:
        results["console"] = "not opened (--no-console)"
    elif chromium is None:
        results["console"] = "skipped: no Chromium (apt-get install chromium)"
    else:
        try:
            tab = ConsoleTab(service.url, service.key, chromium)
            results["console"] = f"headless {tab.browser.version}"
        except Exception as e:  # noqa: BLE001 - the console row is optional
            results["console"] = f"skipped: {type(e).__name__}: {e}"

    ctx = multiprocessing.get_context("spawn")
    go, stop, sent = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    loader = ctx.Process(target=_load, daemon=True,
                         args=(service.url, service.key, service.names, args.requests,
                               args.max_tokens, go, stop, sent))
    loader.start()
    times: dict[str, list[float]] = {}
    console_requests = 0
    window = args.poll_seconds / args.windows
    headers = {"Authorization": f"Bearer {service.key}"}
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
            _poll(http, service.polled, 1)  # warm-up
            for _ in range(args.windows):
                for with_console in ([False, True] if tab is not None else [False]):
                    if tab is not None and with_console:
                        # Open, then kept open through an idle and a saturated window; its
                        # page load is over before the polls are timed.
                        tab.show(service.polled)
                        time.sleep(CONSOLE_SETTLE_SECONDS)
                    for mode in ("idle", "busy"):
                        if mode == "idle":
                            go.clear()
                            while (state := service.engine_stats())["busy"] or state["queued"]:
                                time.sleep(0.05)
                        else:
                            go.set()
                            while not service.engine_stats()["busy"]:
                                time.sleep(0.01)
                        name = mode + ("_console" if with_console else "")
                        times.setdefault(name, []).extend(_poll(http, service.polled, window))
                    if tab is not None and with_console:
                        console_requests += tab.hide()
    finally:
        stop.set()
        go.clear()
        loader.join(timeout=120)
        if loader.is_alive():
            loader.terminate()
        if tab is not None:
            tab.close()
    for name, values in times.items():
        results[name] = {"polls": len(values), "p50_ms": round(percentile(values, 50), 2),
                         "p99_ms": round(percentile(values, 99), 2)}
    idle = results["idle"]["p99_ms"]
    results["p99_ratio"] = round(results["busy"]["p99_ms"] / idle, 2)
    if tab is not None:
        results["console_p99_ratio"] = round(results["busy_console"]["p99_ms"] / idle, 2)
        results["console_idle_p99_ratio"] = round(results["idle_console"]["p99_ms"] / idle, 2)
        results["console_api_requests"] = console_requests
        results["console_seconds"] = round((2 * window + CONSOLE_SETTLE_SECONDS)
                                           * args.windows, 1)
    results["completions"] = sent.value
    return results
