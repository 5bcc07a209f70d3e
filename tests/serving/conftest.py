"""Fixtures for serving: adapters with known random weights, an in-process engine, and a live
stack (API + worker + engine processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stack import CLI, LIVE_STACKS, REPO_ROOT, Stack, StackError, free_port

torch = pytest.importorskip("torch")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


# --------------------------------------------------------------------------- adapters
def build_adapter(base: Path, dest: Path, seed: int, *, prompt_format: dict[str, Any] | None = None,
                  r: int = 8, std: float = 0.3) -> Path:
    """Save a LoRA adapter of ``base`` with random, non-zero weights drawn from ``seed`` (so
    different seeds give clearly different outputs), in the worker's layout: PEFT files plus
    ``lorafleet.json``. An existing ``dest`` is replaced the way the worker replaces it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS,
                       init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, std)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    meta = {"base_model": str(base), "prompt_format": prompt_format or {"type": "dolly"},
            "max_length": 1024}
    (tmp / "lorafleet.json").write_text(json.dumps(meta))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


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
    from shared.settings import Settings
    from worker.serving.app import Engine

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

    def engine_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.engine_url}/health", timeout=10).json()


def start_engine(stack: Stack, port: int, timeout: float = 120.0
                 ) -> tuple[subprocess.Popen[bytes], Path]:
    """``lorafleet serve`` with the stack's environment; returns once ``/health`` answers."""
    log_path = stack.log_dir / "engine.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([*CLI, "serve"], cwd=REPO_ROOT, env=stack.env,
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


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[ServingStack]:
    """API + one worker + engine, as real processes. A test module may set
    ``SERVING_SETTINGS = {...}`` (Settings fields) for its stack."""
    # The tiny model lives in pytest's temporary folder: the operator allows local models
    # from there (the API refuses local paths otherwise).
    settings = {"models_dir": tmp_path_factory.getbasetemp(), "engine_device": "cpu",
                "engine_torch_threads": 1, **getattr(request.module, "SERVING_SETTINGS", {})}
    # One thread per process: the tiny model gains nothing from more, and the worker, the
    # engine and the test process share the machine's cores.
    stack = Stack(tmp_path_factory.mktemp("serving"), settings=settings,
                  env={"OMP_NUM_THREADS": "1"})
    port = free_port()
    while port == stack.port:  # both were free a moment ago; they must differ
        port = free_port()
    stack.settings.update(engine_port=port, engine_url=f"http://127.0.0.1:{port}")
    stack.start()
    try:
        proc, log_path = start_engine(stack, port)
    except BaseException:
        stack.stop()
        raise
    try:
        yield ServingStack(stack, proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop_engine(proc)
        stack.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for stack in LIVE_STACKS:
            log = stack.log_dir / "engine.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-120:]
                report.sections.append(("lorafleet engine log", "\n".join(tail)))
    return report
