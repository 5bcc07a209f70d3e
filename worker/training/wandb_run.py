"""A job's Weights & Biases run: its config and metrics, logged online or in W&B's offline mode.

OpenAI's integration (``integrations: [{"type": "wandb", "wandb": {project, name, entity,
tags}}]``) on the ``wandb`` package. W&B is an observer: nothing it does may fail or stop a job,
so every call into it is guarded, and the first failure turns the run off with a warning.

Where it logs (the ``wandb_mode`` setting): ``auto`` tries W&B's servers first and, when there
is no API key or no answer, logs in W&B's offline mode instead; ``offline`` never tries. An
offline run is a folder under the job's storage (``jobs/<id>/wandb/offline-run-…``) that
``wandb sync <folder>`` uploads later. Each attempt of a job (after a pause or a preemption) is
the same W&B run id, resumed (``resume="allow"``): online, the attempts log into one run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.schemas import WandbIntegration
from worker.training.hooks import (
    CheckpointInfo,
    EarlyStop,
    Hooks,
    Metrics,
    StartInfo,
    metrics_data,
)

log = logging.getLogger(__name__)

# How long ``wandb.init`` may wait for W&B's servers before the run goes offline instead.
ONLINE_INIT_TIMEOUT = 30.0

#: ``report(level, message, data)``: how the run tells the job what it did (an event).
Report = Callable[[str, str, dict[str, Any]], None]


class WandbRun(Hooks):
    """Logs a job's config (at the start of training) and metrics to one W&B run.

    Args:
        options: the job's ``integrations[].wandb``.
        run_id: the W&B run id (the job id: every attempt resumes the same run).
        directory: where W&B writes (the offline run's folder goes under it).
        config: the job's configuration, logged as the run's config.
        mode: ``"auto"`` (online if possible, else offline) or ``"offline"``.
        report: tells the job where the run is, or why it stopped logging.
    """

    def __init__(self, options: WandbIntegration, *, run_id: str, directory: Path,
                 config: dict[str, Any], mode: str, report: Report):
        self.options = options
        self.run_id = run_id
        self.directory = directory
        self.config = config
        self.mode = mode
        self.report = report
        self.run: Any = None
        self.failed = False

    # ----------------------------------------------------------------------- hooks
    def on_start(self, info: StartInfo) -> None:
        if self.run is None:
            self._guarded("starting the run", self._start, needs_run=False)
        self._guarded("logging the config",
                      lambda: self.run.config.update({"training": asdict(info)},
                                                     allow_val_change=True))

    def on_metrics(self, metrics: Metrics) -> None:
        values = {k: v for k, v in metrics_data(metrics).items() if k != "step" and v is not None}
        self._guarded("logging metrics", lambda: self.run.log(values, step=metrics.step))

    def on_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self._guarded("logging a checkpoint",
                      lambda: self.run.summary.update({"last_checkpoint_step": checkpoint.step}))

    def on_early_stop(self, stop: EarlyStop) -> None:
        self._guarded("logging the early stop",
                      lambda: self.run.summary.update({"early_stopping": asdict(stop)}))

    def finish(self, outcome: str) -> None:
        """End the run: ``outcome`` is how this attempt ended (``succeeded``, ``paused``, …);
        one that is no failure of the job's own ends it with exit code 0."""
        if self.run is None:
            return
        run, self.run = self.run, None
        code = 0 if outcome in ("succeeded", "paused", "preempted", "cancelled") else 1
        try:
            run.summary.update({"outcome": outcome})
            run.finish(exit_code=code)
        except Exception as e:  # noqa: BLE001 - W&B never fails a job
            self._warn("finishing the run", e)

    # ----------------------------------------------------------------------- internals
    def _start(self) -> None:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        why_offline = "the worker is set to W&B's offline mode (wandb_mode=offline)"
        if self.mode != "offline":
            try:
                self.run = self._init(wandb, "online")
            except Exception as e:  # noqa: BLE001 - no key, no network: log offline instead
                why_offline = f"W&B online was not available ({type(e).__name__}: {e})"
                log.info("wandb online init failed for %s: %s", self.run_id, e)
        if self.run is None:
            self.run = self._init(wandb, "offline")
            folder = Path(self.run.settings.sync_file).parent
            self.report("info", f"Weights & Biases run '{self.run.name}' is logged offline in "
                        f"{folder}: {why_offline}; upload it with `wandb sync {folder}`",
                        {"integration": "wandb", "mode": "offline", "run_id": self.run.id,
                         "path": str(folder), "wandb_file": str(self.run.settings.sync_file)})
        else:
            self.report("info", f"Weights & Biases run '{self.run.name}': {self.run.url}",
                        {"integration": "wandb", "mode": "online", "run_id": self.run.id,
                         "url": self.run.url})

    def _init(self, wandb: Any, mode: str) -> Any:
        return wandb.init(
            mode=mode, dir=str(self.directory), id=self.run_id, resume="allow",
            project=self.options.project, entity=self.options.entity,
            name=self.options.name or self.run_id, tags=self.options.tags,
            config=self.config,
            settings=wandb.Settings(
                # The worker's own output stays its own; its source and git are not the job's.
                console="off", silent=True, save_code=False, disable_git=True,
                init_timeout=ONLINE_INIT_TIMEOUT),
        )

    def _guarded(self, what: str, call: Callable[[], Any], *, needs_run: bool = True) -> None:
        """``call()``, unless the run failed before; its first failure turns the run off."""
        if self.failed or (needs_run and self.run is None):
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001 - W&B never fails a job
            self._warn(what, e)
            self.failed = True
            run, self.run = self.run, None
            if run is not None:
                try:
                    run.finish(exit_code=1)
                except Exception:  # noqa: BLE001
                    log.warning("wandb: could not finish run %s", self.run_id, exc_info=True)

    def _warn(self, what: str, error: Exception) -> None:
        log.warning("wandb: %s failed for %s", what, self.run_id, exc_info=error)
        try:
            self.report("warn", f"Weights & Biases: {what} failed ({type(error).__name__}: "
                        f"{error}); the job goes on without it",
                        {"integration": "wandb", "error": f"{type(error).__name__}: {error}"})
        except Exception:  # noqa: BLE001 - the job's own writes decide about the job
            log.warning("wandb: could not report the failure", exc_info=True)
