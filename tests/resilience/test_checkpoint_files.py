"""Which checkpoint folders on a worker's disk count: the completion marker, leftovers of
killed saves, retention, and a lease that runs out locally. (In storage:
tests/worker/test_checkpoint_store.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.lifecycle import Claim
from shared.storage import COMPLETE_MARKER
from worker import checkpoints
from worker.checkpoints import REQUIRED_FILES


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder with every file transformers writes; marked complete or not."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (path / name).write_bytes(b"x" * (step + 10))
    if complete:
        checkpoints.write_marker(path, step)
    return path


def test_only_marked_checkpoints_with_intact_files_are_complete(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path, 4)
    unmarked = make_checkpoint(tmp_path, 8, complete=False)
    truncated = make_checkpoint(tmp_path, 12)
    (truncated / "optimizer.pt").write_bytes(b"x")

    assert checkpoints.complete_checkpoint(good)
    assert not checkpoints.complete_checkpoint(unmarked)
    assert not checkpoints.complete_checkpoint(truncated)
    assert [s for s, _ in checkpoints.list_complete(tmp_path)] == [4]


def test_a_checkpoint_missing_files_cannot_be_marked(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 4, complete=False)
    (path / "optimizer.pt").unlink()

    with pytest.raises(RuntimeError, match="optimizer.pt"):
        checkpoints.write_marker(path, 4)
    assert not (path / COMPLETE_MARKER).exists()


def test_leftovers_of_killed_saves_are_removed(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path, 4)
    unmarked = make_checkpoint(tmp_path, 8, complete=False)
    staging = tmp_path / ".staging-abc"
    make_checkpoint(staging, 12)

    removed = checkpoints.clean_incomplete(tmp_path)

    assert sorted(p.name for p in removed) == [".staging-abc", "checkpoint-8"]
    assert good.is_dir() and not unmarked.exists() and not staging.exists()


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)

    deleted = checkpoints.apply_retention(tmp_path, keep=2)

    assert deleted == [2, 4]
    assert [s for s, _ in checkpoints.list_complete(tmp_path)] == [6, 8]


def claim_for(job_id: str, last_good: int | None) -> Claim:
    rel = f"jobs/{job_id}/checkpoints/checkpoint-{last_good}" if last_good else None
    return Claim(job_id, 2, "host:1", {}, "model", rel, last_good, 1, "p", None)


def test_a_lease_not_renewed_in_time_runs_out_on_the_worker() -> None:
    from worker.runner import Heartbeat

    beat = Heartbeat(claim_for("ftjob-z", None), interval=0.5, lease_seconds=5)

    assert not beat.expired()
    beat.renewed = time.monotonic() - 3.9
    assert not beat.expired()
    beat.renewed = time.monotonic() - 4.1  # lease minus two heartbeats
    assert beat.expired()
