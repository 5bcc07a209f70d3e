"""A job's W&B run: offline where W&B online is not to be had, and never the job's failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

wandb = pytest.importorskip("wandb")

from shared.schemas import WandbIntegration  # noqa: E402
from tests.support.wandb_files import wandb_history, wandb_run_record  # noqa: E402
from worker.training import StartInfo, TrainMetrics, ValidationMetrics  # noqa: E402
from worker.training.wandb_run import WandbRun  # noqa: E402

START = StartInfo(trainable_parameters=10, total_parameters=100, examples=8, dropped_too_long=0,
                  validation_examples=4, total_steps=2, start_step=0)
OPTIONS = WandbIntegration(project="lorafleet-tests", name="tiny run", entity="team",
                           tags=["tiny", "test"])


@pytest.fixture(autouse=True)
def no_wandb_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No W&B account here, whatever the machine has: no key, no netrc, settings in tmp."""
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def make_run(tmp_path: Path, mode: str = "offline") -> tuple[WandbRun, list[tuple[str, ...]]]:
    reports: list[tuple[str, ...]] = []
    run = WandbRun(OPTIONS, run_id="ftjob-wandbtest", directory=tmp_path / "job",
                   config={"model": "tiny", "learning_rate": 0.01}, mode=mode,
                   report=lambda level, message, data: reports.append((level, message, data)))
    return run, reports


def test_an_offline_run_holds_the_config_and_the_losses(tmp_path: Path) -> None:
    run, reports = make_run(tmp_path)

    run.on_start(START)
    run.on_metrics(TrainMetrics(step=1, train_loss=2.5, learning_rate=0.01, epoch=0.5,
                                train_mean_token_accuracy=0.25))
    run.on_metrics(TrainMetrics(step=2, train_loss=2.0, learning_rate=0.005, epoch=1.0,
                                train_mean_token_accuracy=0.5))
    run.on_metrics(ValidationMetrics(step=2, valid_loss=2.25, valid_mean_token_accuracy=0.375))
    run.finish("succeeded")

    [(level, message, data)] = reports
    folder = Path(data["path"])
    assert (level, data["mode"], data["run_id"]) == ("info", "offline", "ftjob-wandbtest")
    assert folder.parent == tmp_path / "job" / "wandb" and folder.name.startswith("offline-run")
    assert f"wandb sync {folder}" in message
    history = wandb_history(folder)
    assert {s: h["train_loss"] for s, h in history.items()} == {1: 2.5, 2: 2.0}
    assert (history[2]["valid_loss"], history[2]["valid_mean_token_accuracy"]) == (2.25, 0.375)
    record = wandb_run_record(folder)
    assert (record["project"], record["entity"], record["display_name"]) == (
        "lorafleet-tests", "team", "tiny run")
    assert record["tags"] == ["tiny", "test"]
    assert record["config"]["update"]["learning_rate"] == 0.01


def test_without_a_key_auto_mode_logs_offline_and_says_why(tmp_path: Path) -> None:
    run, reports = make_run(tmp_path, mode="auto")

    run.on_start(START)
    run.on_metrics(TrainMetrics(step=1, train_loss=1.5, learning_rate=None, epoch=1.0))
    run.finish("succeeded")

    [(level, message, data)] = reports
    assert (level, data["mode"]) == ("info", "offline")
    assert "W&B online was not available" in message
    assert wandb_history(Path(data["path"]))[1]["train_loss"] == 1.5


def test_a_failing_wandb_warns_once_and_never_raises(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("wandb-core crashed")

    monkeypatch.setattr(wandb, "init", broken)
    run, reports = make_run(tmp_path)

    run.on_start(START)
    run.on_metrics(TrainMetrics(step=1, train_loss=1.5, learning_rate=None, epoch=1.0))
    run.finish("succeeded")

    [(level, message, data)] = reports
    assert level == "warn"
    assert "starting the run failed (RuntimeError: wandb-core crashed)" in message
    assert data["error"] == "RuntimeError: wandb-core crashed"
