"""``lorafleet demo``: the whole service on this machine, in one local folder.

Builds the tiny model (once), creates an API key, starts ``lorafleet up`` (API, one worker and the
inference engine) with an SQLite database and the filesystem broker inside the folder, uploads the
bundled sample data, fine-tunes a LoRA adapter over the REST API, shows the live progress bar,
asks the new model for one completion, then stops the service. Nothing is downloaded and no
external server is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from cli.watch import report_job, watch_job
from shared.lifecycle import TERMINAL, JobStatus
from shared.samples import SAMPLE_PATH
from shared.settings import get_settings

HEALTH_TIMEOUT_S = 120.0
ENGINE_TIMEOUT_S = 60.0
LOG_NAME = "service.log"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``lorafleet demo`` was asked for: its folder, API port and training length."""

    folder: Path
    port: int | None = None
    max_steps: int = 40
    save_steps: int = 10


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pick_port(requested: int | None) -> int:
    """``--port``, else ``LORAFLEET_PORT`` when it was set, else any free port."""
    if requested:
        return requested
    settings = get_settings()
    return settings.port if "port" in settings.model_fields_set else _free_port()


def service_env(folder: Path, port: int, engine_port: int) -> dict[str, str]:
    """The environment of the demo's child processes: everything lives in ``folder``.

    The database and broker URLs are forced empty (SQLite file, filesystem broker) so that a
    production configuration in the caller's environment is never touched by the demo.
    """
    env = dict(os.environ)
    env.update({
        "LORAFLEET_STORAGE_DIR": str(folder / "storage"),
        "LORAFLEET_DATABASE_URL": "",
        "LORAFLEET_BROKER_URL": "",
        "LORAFLEET_HOST": "127.0.0.1",
        "LORAFLEET_PORT": str(port),
        "LORAFLEET_ENGINE_HOST": "127.0.0.1",
        "LORAFLEET_ENGINE_PORT": str(engine_port),
        "LORAFLEET_ENGINE_URL": f"http://127.0.0.1:{engine_port}",
        "LORAFLEET_MODELS_DIR": str(folder),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def ensure_tiny_model(path: Path) -> Path:
    """Build the tiny model at ``path`` unless a complete one is there.

    It is written to a sibling temporary folder and renamed into place, so an interrupted build
    never leaves a half-written model that a later run would take as complete.
    """
    if (path / "config.json").is_file():
        _say(f"tiny model: {path} (already built)")
        return path
    from worker.tiny_model import build_tiny_model

    _say(f"building the tiny model in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=path.parent))
    try:
        build_tiny_model(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def create_key(env: dict[str, str]) -> str:
    """A fresh API key for the project ``demo`` (``lorafleet keys create``)."""
    out = subprocess.run(_cli("keys", "create", "--project", "demo", "--name", "demo"),
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise DemoError(f"lorafleet keys create failed:\n{out.stderr.strip()}")
    return out.stdout.strip().splitlines()[0]


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``/health`` until it answers 200; fail early if the service exits."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"lorafleet up exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    raise DemoError(f"no healthy API after {HEALTH_TIMEOUT_S:.0f}s:\n{_log_tail(log)}")


def stop_service(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGINT to ``lorafleet up`` (it stops API and worker), then wait; kill as a last resort."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=get_settings().preempt_grace_seconds + 30)
    except subprocess.TimeoutExpired:
        # ``up`` leads its own process group (start_new_session), so this reaches only the
        # service's own processes.
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise DemoError(f"{what} failed: HTTP {r.status_code} {r.text}")
    body: dict[str, Any] = r.json()
    return body


def cancel_unfinished(base: str, key: str) -> int:
    """Cancel the demo project's unfinished jobs, left by an interrupted earlier run, so that
    the worker does not train them before this run's job."""
    headers = {"Authorization": f"Bearer {key}"}
    jobs = _check(httpx.get(f"{base}/v1/fine_tuning/jobs", params={"limit": 100},
                            headers=headers, timeout=30), "listing jobs")
    cancelled = 0
    for job in jobs["data"]:
        if job["status"] not in TERMINAL:
            r = httpx.post(f"{base}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers,
                           timeout=30)
            cancelled += r.status_code == 200
    return cancelled


def submit(base: str, key: str, model: Path, opts: DemoOptions) -> str:
    """Upload the bundled sample and create the job over the REST API; returns the job id."""
    headers = {"Authorization": f"Bearer {key}"}
    with SAMPLE_PATH.open("rb") as fh:
        upload = _check(httpx.post(
            f"{base}/v1/files", headers=headers, data={"purpose": "fine-tune"},
            files={"file": (SAMPLE_PATH.name, fh, "application/jsonl")}, timeout=60,
        ), "upload")
    _say(f"uploaded {SAMPLE_PATH.name}: {upload['id']} ({upload['line_count']} records, "
         f"{upload['record_format']})")
    job = _check(httpx.post(f"{base}/v1/fine_tuning/jobs", headers=headers, timeout=60, json={
        "model": str(model),
        "training_file": upload["id"],
        "suffix": "demo",
        "seed": 0,
        "prompt_format": "dolly",
        "max_steps": opts.max_steps,
        "save_steps": opts.save_steps,
        "logging_steps": 5,
        # Higher than the 2e-4 default: the tiny model starts from random weights, and a
        # short run should show the loss going down.
        "learning_rate": 2e-3,
    }), "job creation")
    _say(f"created {job['id']}: {opts.max_steps} steps, checkpoint every {opts.save_steps}")
    return str(job["id"])


def try_completion(base: str, key: str, engine: str, model: str) -> None:
    """Ask the fine-tuned model to summarise a dialogue through ``/v1/completions``.

    Best effort: the demo is about training, so a failure here is reported, not fatal. The
    tiny model is random, so its text is gibberish; the point is the round trip.
    """
    with SAMPLE_PATH.open(encoding="utf-8") as fh:
        dialogue = json.loads(fh.readline())["dialogue"]
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    while True:  # the engine loads torch while the job trains; usually ready by now
        try:
            if httpx.get(f"{engine}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            print("lorafleet demo: inference engine not ready; skipping the completion",
                  file=sys.stderr)
            return
        time.sleep(0.5)
    try:
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "prompt": dialogue, "max_tokens": 24,
                             "temperature": 0}, timeout=120)
    except httpx.HTTPError as e:
        print(f"lorafleet demo: completion failed: {e}", file=sys.stderr)
        return
    if r.status_code != 200:
        print(f"lorafleet demo: completion failed: HTTP {r.status_code} {r.text}",
              file=sys.stderr)
        return
    _say(f"POST /v1/completions with {model}:")
    print(f"    {r.json()['choices'][0]['text']!r}")


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # runs the ``finally`` that stops the service


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; 0 when the job succeeded and its adapter is on disk."""
    if importlib.util.find_spec("torch") is None:
        print("lorafleet demo trains on this machine and needs the worker extra: "
              "pip install -e '.[worker]'", file=sys.stderr)
        return 1
    started = time.monotonic()
    folder = opts.folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    job: dict[str, Any] | None = None
    base = key = ""
    log = folder / LOG_NAME
    try:
        model = ensure_tiny_model(folder / "tiny-model")
        port = _pick_port(opts.port)
        engine_port = _free_port()
        env = service_env(folder, port, engine_port)
        key = create_key(env)
        _say("created an API key for project 'demo'")
        base = f"http://127.0.0.1:{port}"
        _say(f"starting lorafleet up on {base} (API, worker, inference engine; log: {log})")
        log_file = log.open("wb")
        proc = subprocess.Popen(_cli("up"), env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(base, proc, log)
        if leftovers := cancel_unfinished(base, key):
            _say(f"cancelled {leftovers} unfinished job(s) of an earlier run")
        job_id = submit(base, key, model, opts)
        job = watch_job(f"{base}/v1", job_id, key, interval=0.5)
        if job is not None and job["status"] == JobStatus.SUCCEEDED:
            try_completion(base, key, f"http://127.0.0.1:{engine_port}", job["fine_tuned_model"])
    except (DemoError, httpx.HTTPError) as e:
        print(f"lorafleet demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lorafleet demo: interrupted", file=sys.stderr)
        if proc is not None and proc.poll() is None and base and key:
            # Leave no job behind for the next run's worker to pick up.
            with contextlib.suppress(httpx.HTTPError, DemoError):
                cancel_unfinished(base, key)
        return 130
    finally:
        if proc is not None:
            _say("stopping the service")
            code = stop_service(proc)
            if code not in (0, None):
                print(f"lorafleet up exited with {code}; see {log}", file=sys.stderr)
        if log_file is not None:
            log_file.close()
    if job is None:
        return 1
    _say(f"done in {time.monotonic() - started:.0f}s")
    code = report_job(job)
    if code == 0 and not (Path(job["adapter_path"]) / "adapter_config.json").is_file():
        print(f"no adapter at {job['adapter_path']}", file=sys.stderr)
        return 1
    return code
