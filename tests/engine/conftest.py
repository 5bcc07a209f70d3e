"""Fixtures for serving: adapters with known random weights, an in-process engine, and a live
stack (API + worker + engine processes, the engine on vLLM wherever `make venv-vllm` made
.venv-vllm, else the built-in engine).

The stacks of the modules share one vLLM server for the tiny model, started once per session
(``shared_vllm``, :mod:`tests.support.vllm`). A module that tests how the engine starts, widens
and replaces its own servers sets ``SERVING_OWN_VLLM = True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# One adapter builder and one engine stopper for the serving tests and the serving benchmark
# (the bench never imports from tests/).
from bench.serving_fixtures import build_adapter as build_adapter
from bench.serving_latency import stop_engine
from tests.support.backends import EMBEDDED, REDIS_POSTGRES
from tests.support.stack import CLI, LIVE_STACKS, REPO_ROOT, Stack, StackError, free_port
from tests.support.vllm import (
    LAST_SERVING_MODULE,
    SHARED_VLLM_LOGS,
    VLLM_PYTHON,
    SharedVllm,
    vllm_available,
)

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- adapters
@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three adapters of the tiny model with different random weights (read-only)."""
    root = tmp_path_factory.mktemp("adapters")
    return [build_adapter(tiny_model, root / f"adapter-{i}", seed=100 + i) for i in range(3)]


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> Callable[..., list[int]]:
    """Greedy generation at batch size 1 with ``PeftModel.from_pretrained`` (or the bare base
    model for ``adapter=None``): the token ids a served request must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    @torch.inference_mode()
    def generate(adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        ids = torch.tensor([prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


@pytest.fixture(scope="session")
def reference_logprobs(tiny_model: Path) -> Callable[..., Any]:
    """``reference_logprobs(adapter, ids)``: the log-softmax that transformers + peft compute
    in float32 after each token of ``ids`` (row i predicts token i + 1), with
    ``PeftModel.from_pretrained`` (the bare base model for ``adapter=None``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[Path | None, Any] = {}

    @torch.inference_mode()
    def score(adapter: Path | None, ids: list[int]) -> Any:
        if adapter not in models:
            model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(adapter))
            models[adapter] = model.eval()
        logits = models[adapter](input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return score


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: with tiny matrices, thread hand-offs cost more than they save, and
    on a busy machine several threads contend badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- in-process engine
def run(coro: Any) -> Any:
    """Run a coroutine to completion (the engine's API is async)."""
    return asyncio.run(coro)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Any]]:
    """``make_engine(**settings)``: an :class:`Engine` on the CPU with its generation thread
    running (``start=False``: not yet), stopped after the test."""
    from engine.app import Engine
    from shared.settings import Settings

    engines: list[Any] = []

    def factory(start: bool = True, **overrides: Any) -> Any:
        settings = Settings(**{"engine_device": "cpu", "batch_window_ms": 5, **overrides})
        engine = Engine(settings)
        if start:
            engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.stop()


# --------------------------------------------------------------------------- live stack
@dataclass
class ServingStack:
    """A :class:`Stack` plus the engine process it forwards inference to."""

    stack: Stack
    engine: subprocess.Popen[bytes]
    engine_url: str
    engine_log: Path
    backend: str  # "vllm" or "builtin"
    shared_vllm: SharedVllm | None = None  # the session's vLLM server, if it uses it

    def engine_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.engine_url}/health", timeout=10).json()

    def vllm_url(self, base_model: Path | str) -> str:
        """The URL of the vLLM server of ``base_model`` (it must have served a request)."""
        return str(self.engine_stats()["base_models"][str(base_model)]["url"])

    def generating_processes(self) -> list[Any]:
        """The processes that generate: the engine itself, or the vLLM servers it serves
        with (not one it replaced and is stopping), with their engine-core processes."""
        import psutil

        if self.backend != "vllm":
            return [psutil.Process(self.engine.pid)]
        pids = [m["pid"] for m in self.engine_stats()["base_models"].values() if m.get("pid")]
        if self.shared_vllm is not None:  # external to the engine: it reports no pid
            pids.append(self.shared_vllm.pid)
        servers = [psutil.Process(pid) for pid in pids]
        return [p for server in servers for p in [server, *server.children(recursive=True)]]


def vllm_metric(url: str, name: str, **labels: str) -> float:
    """The sum of a vLLM Prometheus metric (``vllm:<name>``) over the series whose labels
    include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line.startswith(f"vllm:{name}{{") and not line.startswith(f"vllm:{name} "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def start_engine(stack: Stack, port: int, timeout: float = 120.0
                 ) -> tuple[subprocess.Popen[bytes], Path]:
    """``lorafleet serve`` with the stack's environment (and a node cache of its own);
    returns once ``/health`` answers."""
    log_path = stack.log_dir / "engine.log"
    env = {**stack.env, "LORAFLEET_CACHE_DIR": str(stack.cache_root / "engine")}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*CLI, "serve"], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the engine exited with {proc.returncode}:\n"
                             f"{log_path.read_text(errors='replace')[-5000:]}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if health.status_code == 200 and "base_models" in health.json():  # the engine's
                return proc, log_path
        time.sleep(0.2)
    stop_engine(proc)
    raise StackError(f"the engine did not answer in {timeout}s:\n"
                     f"{log_path.read_text(errors='replace')[-5000:]}")


def warm_up(engine_url: str, base_model: Path, timeout: float = 900.0) -> None:
    """Have the engine start the vLLM server of ``base_model`` (tens of seconds on a small
    machine), so that the tests' requests find it running."""
    target = {"model": "warm-up", "base_model": str(base_model)}
    answer = httpx.post(f"{engine_url}/v1/completions", timeout=timeout, json={
        "model": "warm-up", "prompt": "Hello", "max_tokens": 1, "raw_prompt": True,
        "target": target})
    if answer.status_code != 200:
        raise StackError(f"the engine did not start vLLM: {answer.status_code} {answer.text}")


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
            tiny_model: Path) -> Iterator[ServingStack]:
    """API + one worker + engine, as real processes; the engine on vLLM when it is there (or
    as ``LORAFLEET_TEST_ENGINE_BACKEND`` says), on the session's vLLM server for the tiny
    model (``shared_vllm``), or with its own started by the engine if the module sets
    ``SERVING_OWN_VLLM = True``. A test module may set ``SERVING_SETTINGS = {...}`` (Settings
    fields, ``engine_backend`` included), ``SERVING_WORKERS`` (default 1) and
    ``SERVING_BACKEND`` (default embedded)."""
    module_settings = getattr(request.module, "SERVING_SETTINGS", {})
    backend = (module_settings.get("engine_backend")
               or os.environ.get("LORAFLEET_TEST_ENGINE_BACKEND")
               or ("vllm" if vllm_available() else "builtin"))
    shared: SharedVllm | None = None
    if backend == "vllm" and not getattr(request.module, "SERVING_OWN_VLLM", False):
        shared = request.getfixturevalue("shared_vllm")
    # The tiny model lives in pytest's temporary folder: the operator allows local models
    # from there (the API refuses local paths otherwise).
    settings = {"models_dir": tmp_path_factory.getbasetemp(), "engine_device": "cpu",
                "engine_torch_threads": 1, "engine_backend": backend,
                "vllm_python": str(VLLM_PYTHON), **module_settings,
                **(shared.engine_settings(module_settings, request.module.__name__)
                   if shared else {})}
    # One thread per process: the tiny model gains nothing from more, and the worker, the
    # engine and the test process share the machine's cores.
    stack_backend = getattr(request.module, "SERVING_BACKEND", EMBEDDED)
    # Redis + PostgreSQL stacks store in S3 (the backends are paired, tests/support/stack.py).
    s3 = request.getfixturevalue("seaweedfs") if stack_backend == REDIS_POSTGRES else None
    stack = Stack(tmp_path_factory.mktemp("serving"), settings=settings,
                  env={"OMP_NUM_THREADS": "1"}, backend=stack_backend, s3=s3,
                  workers=getattr(request.module, "SERVING_WORKERS", 1))
    port = free_port()
    while port == stack.port:  # both were free a moment ago; they must differ
        port = free_port()
    stack.settings.update(engine_port=port, engine_url=f"http://127.0.0.1:{port}")
    stack.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, log_path = start_engine(stack, port)
        if backend == "vllm":
            warm_up(f"http://127.0.0.1:{port}", tiny_model)
    except BaseException:
        if proc is not None:
            stop_engine(proc)
        stack.stop()
        raise
    try:
        yield ServingStack(stack, proc, f"http://127.0.0.1:{port}", log_path, backend, shared)
    finally:
        stop_engine(proc)
        stack.stop()
        if shared is not None and request.node.nodeid == request.config.stash.get(
                LAST_SERVING_MODULE, None):
            shared.stop()  # no module after this one needs it


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        logs = [log for stack in LIVE_STACKS for log in [
            stack.log_dir / "engine.log", *sorted((stack.log_dir / "vllm").glob("*.log"))]]
        if LIVE_STACKS:
            logs += SHARED_VLLM_LOGS
        for log in logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-120:]
                report.sections.append((f"lorafleet {log.name}", "\n".join(tail)))
    return report
