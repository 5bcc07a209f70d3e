"""A worker's metrics: steps, tokens and step times from the progress reports, and one
/metrics for the worker's main process and the pool process it forks (multiprocess mode, in
a process of its own here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shared.lifecycle import Claim
from tests.metrics.conftest import value
from worker import metrics as worker_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


def claim(job_id: str, attempt: int = 1, last_good_step: int | None = None,
          method: str = "supervised") -> Claim:
    return Claim(job_id, attempt, "w1", {"method": method}, "m", None, last_good_step, 0, "p",
                 None)


def training(method: str = "supervised") -> dict[str, float]:
    return {"steps": value("lorafleet_training_steps_total", method=method),
            "tokens": value("lorafleet_training_tokens_total", method=method),
            "timed": value("lorafleet_training_step_duration_seconds_count", method=method)}


@pytest.fixture
def counted() -> Any:
    before = training()
    return lambda: {k: v - before[k] for k, v in training().items()}


def test_a_job_counts_its_steps_and_tokens_from_its_first_report(counted: Any) -> None:
    c = claim("ftjob-fresh")
    worker_metrics.training_progress(c, 1, 100, None)
    worker_metrics.training_progress(c, 2, 210, 50.0)
    worker_metrics.training_progress(c, 2, 210, 50.0)  # the same step again: nothing new
    worker_metrics.training_progress(c, 5, 500, 60.0)

    assert counted() == {"steps": 5, "tokens": 500, "timed": 2}
    assert value("lorafleet_training_tokens_per_second") == 60.0
    worker_metrics.training_idle()
    assert value("lorafleet_training_tokens_per_second") == 0


def test_a_resumed_attempt_counts_from_its_checkpoint_and_its_first_report(counted: Any
                                                                            ) -> None:
    c = claim("ftjob-resumed", attempt=2, last_good_step=10)
    # Its token count at the checkpoint is unknown: tokens count from this report on.
    worker_metrics.training_progress(c, 12, 1_200, None)
    assert counted() == {"steps": 2, "tokens": 0, "timed": 0}
    worker_metrics.training_progress(c, 13, 1_300, None)
    assert counted() == {"steps": 3, "tokens": 100, "timed": 1}
    # Another attempt starts its own count.
    worker_metrics.training_progress(claim("ftjob-resumed", attempt=3, last_good_step=12),
                                     14, 1_400, None)
    assert counted() == {"steps": 5, "tokens": 100, "timed": 1}


def test_steps_are_counted_by_the_jobs_method(counted: Any) -> None:
    before = training("dpo")
    c = claim("ftjob-dpo", method="dpo")
    worker_metrics.training_progress(c, 1, 100, None)
    worker_metrics.training_progress(c, 3, 300, None)

    assert {k: v - before[k] for k, v in training("dpo").items()} == {
        "steps": 3, "tokens": 300, "timed": 1}
    assert counted() == {"steps": 0, "tokens": 0, "timed": 0}  # none counted as supervised


SCRIPT = """
import multiprocessing, sys

import httpx

from shared import metrics as shared_metrics
from shared.lifecycle import Claim
from shared.settings import Settings
from worker import metrics as worker_metrics

settings = Settings(worker_metrics_port=0)
assert worker_metrics.enable(settings)
shared_metrics.webhook_sent("delivered")  # the main process counts too

def pool_process():
    shared_metrics.attempt_started()
    claim = Claim("ftjob-1", 1, "w", {}, "m", None, None, 0, "p", None)
    worker_metrics.training_progress(claim, 4, 400, 123.0)

for _ in range(2):  # the second one replaces the first, as after a crash
    child = multiprocessing.get_context("fork").Process(target=pool_process)
    child.start()
    child.join()
    assert child.exitcode == 0
port = worker_metrics.serve(settings)
sys.stdout.write(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
"""


def test_the_main_process_serves_what_its_pool_processes_counted(tmp_path: Path) -> None:
    from tests.metrics.conftest import sample, scraped

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "LORAFLEET_STORAGE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    samples = scraped(result.stdout)
    assert sample(samples, "lorafleet_job_attempts_total") == 2
    assert sample(samples, "lorafleet_training_steps_total") == 8
    assert sample(samples, "lorafleet_training_tokens_total") == 800
    assert sample(samples, "lorafleet_training_tokens_per_second") == 123.0
    assert sample(samples, "lorafleet_webhook_sends_total", outcome="delivered") == 1
    # Every series exists from the start, at 0.
    assert ("lorafleet_job_requeues_total", frozenset({("reason", "lease_lost")})) in samples
    assert sample(samples, "lorafleet_training_steps_total", method="supervised") == 8
    assert ("lorafleet_training_steps_total", frozenset({("method", "dpo")})) in samples


def test_enabling_after_a_metric_was_created_is_refused() -> None:
    from shared import metrics as shared_metrics
    from shared.settings import Settings

    shared_metrics.job_metrics()
    with pytest.raises(RuntimeError, match="before multiprocess mode"):
        worker_metrics.enable(Settings(worker_metrics_port=0))
    assert worker_metrics.enable(Settings()) is False  # no port: nothing to enable
