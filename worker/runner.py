"""One attempt at one job: claim → heartbeat → preprocess → train → record the outcome."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete

from modelio.loading import ModelLoadError, load_tokenizer
from shared import lifecycle, storage
from shared.db import session_scope
from shared.dependencies import describe, log_failure, unavailable
from shared.errors import DatabaseUnavailable, InvalidDataset
from shared.files import get_file, open_content, save_result_file
from shared.ids import fine_tuned_model_name
from shared.lifecycle import Claim, JobStatus, LeaseLost
from shared.models import File
from shared.schemas import TrainingSpec
from shared.settings import get_settings
from shared.storage import folders
from worker import checkpoints
from worker import metrics as worker_metrics
from worker.commits import SETUP_SECONDS, CommitFailed, Committer, with_backoff
from worker.evaluation import record_evaluation
from worker.training import (
    CheckpointInfo,
    EarlyStop,
    FullValidationMetrics,
    Hooks,
    Metrics,
    Progress,
    Result,
    StartInfo,
    StopTraining,
    method_for,
    metrics_data,
    train_adapter,
)
from worker.training.results import results_columns, results_csv
from worker.training.wandb_run import WandbRun

log = logging.getLogger(__name__)
T = TypeVar("T")

# Set by the SIGTERM/SIGUSR1 handler (worker.celery_app): save a checkpoint, give the job back.
PREEMPT = threading.Event()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat(threading.Thread):
    """Renews the lease in the background and notices cancellation or a lost lease.

    The lease also runs out *here*: a worker that could not renew it for nearly
    ``lease_seconds`` (a database it cannot reach, a process that was frozen) must assume the
    sweeper has given the job to someone else, and stop before it writes anything.
    """

    def __init__(self, claim: Claim, interval: float, lease_seconds: float):
        super().__init__(name=f"heartbeat-{claim.job_id}", daemon=True)
        self.claim = claim
        self.interval = interval
        # Stop a little before the sweeper may re-queue: it acts on the same clock reading.
        self.budget = max(lease_seconds - 2 * interval, lease_seconds / 2)
        self.renewed = time.monotonic()  # the claim itself took the lease
        self.lost = threading.Event()
        self.cancel = threading.Event()
        self.pause = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            sent = time.monotonic()
            try:
                beat = lifecycle.heartbeat(self.claim.job_id, self.claim.attempt)
            except Exception as e:  # a short database outage: keep training, try again
                log_failure(log, f"heartbeat failed for {self.claim.job_id}", e)
                continue
            if beat.alive:
                self.renewed = sent
            else:
                self.lost.set()
            if beat.cancel_requested:
                self.cancel.set()
            if beat.pause_requested:
                self.pause.set()

    def expired(self) -> bool:
        """True once the lease was not renewed for longer than this worker may assume it holds."""
        return time.monotonic() - self.renewed > self.budget

    def stop(self) -> None:
        self._stop.set()


class JobHooks(Hooks):
    """Training hooks that write to the job row, fenced on this attempt, and pass what they
    hear on to the job's integrations (a W&B run)."""

    def __init__(self, claim: Claim, beat: Heartbeat):
        super().__init__()
        self.claim = claim
        self.beat = beat
        self.step = 0
        self.wandb: WandbRun | None = None
        # The Trainer's checkpoints and the final adapter, on this node until committed.
        self.workspace = storage.get_cache().workspace(claim.job_id, f"attempt-{claim.attempt}")
        for stale in self.workspace.parent.glob("attempt-*"):  # of attempts killed here
            if stale != self.workspace:
                shutil.rmtree(stale, ignore_errors=True)
        self.ckpt_root = self.workspace / "checkpoints"
        self.committer = Committer(claim.job_id, claim.attempt, self._record_checkpoint,
                                   beat.lost)

    def report(self, level: str, message: str, data: dict[str, Any]) -> None:
        """An event from an integration; a database hiccup drops it rather than the job."""
        self.write(best_effort=True, event=message, level=level, event_data=data)

    def close(self, outcome: str) -> None:
        """The attempt ended with ``outcome``: end the integrations' runs, stop committing,
        and clear the attempt's working files from this node."""
        self.committer.close()
        if self.wandb is not None:
            self.wandb.finish(outcome)
            self.wandb = None
        shutil.rmtree(self.workspace, ignore_errors=True)

    def write(self, *, best_effort: bool = False, **values: Any) -> None:
        """A fenced write to the job row. Progress writes are ``best_effort``: during a short
        database outage they are skipped rather than stopping training."""
        try:
            if best_effort:
                lifecycle.progress(self.claim.job_id, self.claim.attempt, **values)
            else:
                with_db_retry(lifecycle.progress, self.claim.job_id, self.claim.attempt,
                              **values)
        except LeaseLost:
            self.beat.lost.set()
            raise StopTraining("lease lost") from None
        except Exception as e:
            if not best_effort or not isinstance(unavailable(e), DatabaseUnavailable):
                raise
            log.warning("database unavailable; progress of %s not recorded", self.claim.job_id)

    def on_start(self, info: StartInfo) -> None:
        self.write(
            trainable_parameters=info.trainable_parameters,
            total_parameters=info.total_parameters,
            dataset_stats={"examples": info.examples,
                           "dropped_too_long": info.dropped_too_long,
                           "validation_examples": info.validation_examples},
            progress={"step": info.start_step, "total_steps": info.total_steps},
            event=(f"Training started: {info.examples} examples "
                   f"({info.dropped_too_long} dropped as too long), "
                   f"{info.trainable_parameters:,} trainable of "
                   f"{info.total_parameters:,} parameters, {info.total_steps} steps"),
            event_data=asdict(info),
        )
        if self.wandb is not None:
            self.wandb.on_start(info)

    def on_progress(self, progress: Progress) -> None:
        self.step = progress.step
        worker_metrics.training_progress(self.claim, progress.step, progress.trained_tokens,
                                         progress.tokens_per_second)
        eta = progress.eta_seconds
        self.write(
            best_effort=True,
            # The token count has a column of its own.
            progress={k: v for k, v in asdict(progress).items() if k != "trained_tokens"},
            trained_tokens=progress.trained_tokens,
            estimated_finish=int(time.time() + eta) if eta is not None else None,
        )

    def on_metrics(self, metrics: Metrics) -> None:
        data = metrics_data(metrics)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in data.items()
                          if k != "step" and isinstance(v, float))
        what = ("Full validation at step" if isinstance(metrics, FullValidationMetrics)
                else "Step")
        self.write(best_effort=True, event=f"{what} {metrics.step}: {shown}",
                   event_type="metrics", event_data=data)
        if self.wandb is not None:
            self.wandb.on_metrics(metrics)

    def on_early_stop(self, stop: EarlyStop) -> None:
        self.write(event=f"Early stopping at step {stop.step}: valid_loss did not improve by "
                         f"more than {stop.threshold:g} in {stop.patience} evaluations; the "
                         f"best was {stop.best_valid_loss:.4g} at step {stop.best_step}, whose "
                         "adapter the job delivers",
                   event_data=asdict(stop))
        if self.wandb is not None:
            self.wandb.on_early_stop(stop)

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """Committed to storage in the background (:mod:`worker.commits`)."""
        try:
            self.committer.submit(checkpoint)
        except LeaseLost:
            self.beat.lost.set()
            raise StopTraining("lease lost") from None

    def _record_checkpoint(self, checkpoint: CheckpointInfo, key: str) -> None:
        """A committed checkpoint becomes the job's resume point; retention follows (on the
        committing thread)."""
        with_db_retry(lifecycle.record_checkpoint, self.claim.job_id, self.claim.attempt,
                      checkpoint.step, key, checkpoint.metrics())
        best = checkpoints.step_of(checkpoint.best_path) if checkpoint.best_path else None
        deleted = checkpoints.apply_store_retention(
            storage.get_store(), self.claim.job_id, get_settings().keep_checkpoints,
            protect=[checkpoint.step, best])
        with_db_retry(lifecycle.mark_checkpoints_deleted, self.claim.job_id, deleted)
        if self.wandb is not None:
            self.wandb.on_checkpoint(checkpoint)

    def local_checkpoint(self, path: Path) -> Path:
        if checkpoints.complete_checkpoint(path):
            return path
        step = checkpoints.step_of(path)
        saved = [r for r in checkpoints.recorded(self.claim.job_id) if r.step == step]
        if not saved:
            return path  # the reader reports it gone
        return checkpoints.fetch_checkpoint(storage.get_store(), storage.get_cache(),
                                            saved[-1].key)

    def should_stop(self) -> str | None:
        if self.beat.lost.is_set():
            return "lost"
        if self.beat.expired():
            log.warning("job %s: lease not renewed for %.1fs; stopping", self.claim.job_id,
                        time.monotonic() - self.beat.renewed)
            self.beat.lost.set()
            return "lost"
        if self.beat.cancel.is_set():
            return "cancel"
        if self.beat.pause.is_set():
            return "pause"
        if PREEMPT.is_set():
            return "preempt"
        return None


def with_db_retry(fn: Callable[..., T], *args: Any, tries: int = 8, **kwargs: Any) -> T:
    """Call ``fn``, riding out a short database outage (about a minute with backoff)."""
    delay = 0.5
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if i == tries - 1 or not isinstance(unavailable(e), DatabaseUnavailable):
                raise
            log.warning("database unavailable (%s); retrying in %.1fs", describe(e), delay)
            time.sleep(delay)
            delay = min(delay * 2, 15)
    raise AssertionError("unreachable")


def _give_up_lease(claim: Claim, step: int) -> None:
    """After this worker stopped for a lost or expired lease: if the job is somehow still ours
    (the lease expired here first), hand it back now rather than after the sweeper's wait."""
    try:
        lifecycle.release(claim.job_id, claim.attempt, count_failure=True, step=step or None,
                          reason=f"Attempt {claim.attempt} could not renew its lease")
        lifecycle.end_attempt(claim.job_id, claim.attempt, "fenced")
    except Exception as e:  # noqa: BLE001 - the database is away: the sweeper re-queues the job
        log_failure(log, f"could not give {claim.job_id} back", e)


def _resume_point(claim: Claim) -> tuple[int, Path] | None:
    """The job's last good checkpoint, fetched to this node and checked; an older recorded
    one if it is gone or damaged."""
    return checkpoints.resume_point(claim.job_id, claim.last_good_checkpoint,
                                    claim.last_good_step)


def run_job(job_id: str, worker: str | None = None) -> str:
    """Run one attempt of ``job_id`` if this worker wins the claim. Returns the outcome.

    Never raises for a job's own problems: bad data or a model that does not load fail the
    job with a reason; other errors give the job back for another attempt (up to
    ``max_attempts``). Only the loss of the lease ends an attempt silently.
    """
    worker = worker or worker_name()
    claim = lifecycle.claim(job_id, worker)
    if claim is None:
        log.info("job %s: not claimable (taken, finished, or not yet due)", job_id)
        return "skipped"
    settings = get_settings()
    beat = Heartbeat(claim, settings.heartbeat_seconds, settings.lease_seconds)
    beat.start()
    hooks = JobHooks(claim, beat)
    outcome = "crashed"  # until the attempt says how it ended
    try:
        outcome = _attempt(claim, hooks)
        return outcome
    except (StopTraining, LeaseLost):
        log.warning("job %s attempt %d lost its lease; stopped", job_id, claim.attempt)
        _give_up_lease(claim, hooks.step)
        outcome = "lost"
        return outcome
    except (InvalidDataset, ModelLoadError) as e:
        with_db_retry(lifecycle.finish, job_id, claim.attempt, JobStatus.FAILED, level="error",
                      message=f"Job failed: {e.message}",
                      error={"code": e.code, "message": e.message, "param": e.param})
        outcome = "failed"
        return outcome
    except Exception as e:  # noqa: BLE001 - anything else may be transient (OOM, I/O, a bug)
        log.exception("job %s attempt %d crashed", job_id, claim.attempt)
        with_db_retry(lifecycle.release, job_id, claim.attempt, count_failure=True,
                      reason=f"Attempt {claim.attempt} failed: {type(e).__name__}: {e}",
                      step=hooks.step or None)
        outcome = "retry"
        return outcome
    finally:
        hooks.close(outcome)
        beat.stop()
        gc.collect()
        _empty_device_cache()


def _attempt(claim: Claim, hooks: JobHooks) -> str:
    settings = get_settings()
    spec = TrainingSpec.model_validate(claim.spec)
    store = storage.get_store()
    ckpt_root = hooks.ckpt_root
    # A store or database that is away for a moment delays the start; it costs no attempt.
    leftovers = with_backoff(lambda: checkpoints.clean_store(
        store, claim.job_id, claim.attempt, [r.key for r in checkpoints.recorded(claim.job_id)]),
        f"cleaning up after earlier attempts of {claim.job_id}", budget=SETUP_SECONDS)
    if leftovers:
        log.info("job %s: removed %s", claim.job_id, leftovers)
        hooks.write(event="Removed checkpoint folders that earlier attempts left uncommitted "
                          "or unrecorded: " + ", ".join(leftovers),
                    event_data={"removed": leftovers})
    resumed = with_backoff(lambda: _resume_point(claim), f"fetching the resume point of "
                           f"{claim.job_id}", budget=SETUP_SECONDS)
    resume = resumed[1] if resumed is not None else None
    if resumed is not None:
        step = resumed[0]
        hooks.write(resumed_from_step=step,
                     event=f"Resumed from checkpoint-{step} on attempt {claim.attempt}",
                     event_data={"step": step, "attempt": claim.attempt})

    (train_path, train_hash), valid = with_backoff(
        lambda: with_db_retry(_input_files, claim.project, spec),
        f"fetching the files of {claim.job_id}", budget=SETUP_SECONDS)
    valid_path, valid_hash = valid if valid else (None, None)

    hooks.wandb = _wandb_run(claim, spec, hooks)
    tokenizer = load_tokenizer(spec.model)
    method = method_for(spec)
    data = method.prepare(spec, tokenizer, train_path, train_hash, valid_path, valid_hash)
    if data.cached:
        hooks.write(event="Using the preprocessed data set cached by an earlier attempt")
    name = fine_tuned_model_name(claim.model, claim.suffix, claim.job_id)
    result = train_adapter(
        spec, tokenizer, data, ckpt_root, hooks.workspace / "adapter",
        resume_from=resume, device=settings.device, hooks=hooks,
        adapter_meta={"job_id": claim.job_id, "fine_tuned_model": name},
    )
    hooks.committer.drain()  # a paused or preempted job resumes from its last checkpoint
    if result.stopped == "cancel":
        with_db_retry(lifecycle.finish, claim.job_id, claim.attempt, JobStatus.CANCELLED,
                      message=f"Job cancelled at step {result.step}")
        return "cancelled"
    if result.stopped == "pause":
        with_db_retry(lifecycle.paused, claim.job_id, claim.attempt, step=result.step)
        return "paused"
    if result.stopped == "preempt":
        with_db_retry(lifecycle.preempt, claim.job_id, claim.attempt,
                      reason="Worker shutting down (preempted); checkpoint saved",
                      step=result.step)
        return "preempted"
    assert result.adapter_dir is not None
    if valid_path is not None:  # the quality card; never fails the job
        record_evaluation(hooks, spec, result.adapter_dir, valid_path, device=settings.device,
                          max_examples=settings.eval_max_examples,
                          max_new_tokens=settings.eval_max_new_tokens)
    adapter = storage.adapter_key(claim.job_id, claim.attempt)
    try:
        with_backoff(lambda: folders.commit_folder(
            store, result.adapter_dir, adapter, meta={"attempt": claim.attempt},
            before_commit=hooks.committer.fence), f"committing the adapter of {claim.job_id}")
    except LeaseLost:
        hooks.committer.take_back(adapter)
        raise
    results = _store_results(claim, hooks, result, results_columns(method.metric_names))
    done = with_db_retry(
        lifecycle.finish, claim.job_id, claim.attempt, JobStatus.SUCCEEDED,
        message=f"Fine-tuning job succeeded: {name}, adapter at {store.url(adapter)}",
        fine_tuned_model=name, adapter_dir=adapter,
        trained_tokens=result.trained_tokens, estimated_finish=None,
        result_files=[f.id for f in results],
    )
    if not done:
        _drop_results(results)
        hooks.committer.take_back(adapter)
        raise LeaseLost("lost the lease at the end of training")
    best = checkpoints.step_of(result.best_checkpoint) if result.best_checkpoint else None
    deleted = checkpoints.apply_store_retention(store, claim.job_id, settings.keep_checkpoints,
                                                protect=[best])
    with_db_retry(lifecycle.mark_checkpoints_deleted, claim.job_id, deleted)
    # What earlier attempts left unrecorded (a step saved again replaces its record). The job
    # has succeeded: a store that stays away only leaves these folders behind.
    try:
        with_backoff(lambda: checkpoints.clean_store(
            store, claim.job_id, claim.attempt,
            [r.key for r in checkpoints.recorded(claim.job_id)]),
            f"cleaning up after {claim.job_id}", budget=SETUP_SECONDS)
    except CommitFailed as e:
        log.warning("%s; left in storage", e)
    return "succeeded"


def _input_files(project: str, spec: TrainingSpec
                 ) -> tuple[tuple[Path, str], tuple[Path, str] | None]:
    """The training file's and the validation file's content paths and sha256."""
    with session_scope() as s:
        train = get_file(s, spec.training_file, project)
        valid = get_file(s, spec.validation_file, project) if spec.validation_file else None
        return ((open_content(train), train.sha256),
                (open_content(valid), valid.sha256) if valid else None)


def _wandb_run(claim: Claim, spec: TrainingSpec, hooks: JobHooks) -> WandbRun | None:
    """The job's W&B run, if it asked for one (started with training, by ``on_start``)."""
    options = next((i.wandb for i in spec.integrations if i.type == "wandb"), None)
    if options is None:
        return None
    mode = get_settings().wandb_mode
    if mode == "disabled":
        hooks.report("warn", "Weights & Biases is disabled on this worker (wandb_mode="
                     "disabled): the run is not logged", {"integration": "wandb"})
        return None
    config = {"job_id": claim.job_id, "attempt": claim.attempt,
              "fine_tuned_model": fine_tuned_model_name(claim.model, claim.suffix, claim.job_id),
              **spec.model_dump(mode="json", exclude={"integrations"})}
    return WandbRun(options, run_id=claim.job_id,
                    directory=storage.local_folder("jobs", claim.job_id),
                    config=config, mode=mode, report=hooks.report)


def _store_results(claim: Claim, hooks: JobHooks, result: Result,
                   columns: tuple[str, ...]) -> list[File]:
    """The job's per-step metrics as a ``fine-tune-results`` CSV file of its project. A file
    that cannot be written costs the job a warning, not its success."""
    if not result.metrics:
        return []
    try:
        with session_scope() as s:
            row = save_result_file(s, claim.project, "step_metrics.csv",
                                   results_csv(result.metrics, columns), columns=list(columns))
            s.expunge(row)
            return [row]
    except Exception as e:  # noqa: BLE001 - the adapter is what the job is for
        log.warning("job %s: results file not stored", claim.job_id, exc_info=True)
        hooks.report("warn", f"The per-step metrics file could not be stored: {e}", {})
        return []


def _drop_results(rows: list[File]) -> None:
    """Remove result files of an attempt that lost the job at its very end."""
    try:
        with session_scope() as s:
            for row in rows:
                s.execute(delete(File).where(File.id == row.id))
                storage.get_store().delete([row.path])
    except Exception:  # noqa: BLE001 - a stray file is no reason to stop giving the job back
        log.warning("could not remove result files %s", [r.id for r in rows], exc_info=True)


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

