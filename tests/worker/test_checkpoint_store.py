"""Checkpoints in storage, on a folder and on S3 alike: committed by a fenced manifest in the
background, resumed from the newest recorded one whose files check out, cleaned up after
attempts that died or lost their lease, and kept to the newest few."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from shared import lifecycle, storage
from shared.db import session_scope
from shared.ids import now
from shared.lifecycle import LeaseLost
from shared.models import Checkpoint, Job
from shared.storage import folders
from tests.resilience.test_checkpoint_files import make_checkpoint
from tests.support.seaweedfs import SeaweedFS
from worker import checkpoints
from worker.commits import Committer
from worker.training import CheckpointInfo

JOB = "ftjob-store"


@pytest.fixture(params=["file", "s3"])
def stored(request: pytest.FixtureRequest, settings_env: Callable[..., Any]) -> Iterator[str]:
    """This process's settings on a folder or on a bucket of the test S3 server, with a
    migrated database holding one running job (attempt 2)."""
    if request.param == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket = on_bucket(server, settings_env)
    else:
        settings_env()
        with_running_job()
    yield request.param
    if request.param == "s3":
        server.drop_bucket(bucket)


@pytest.fixture
def own_store(tmp_path: Path, settings_env: Callable[..., Any]) -> Iterator[SeaweedFS]:
    """:func:`stored` on S3, on a server of this test's own, which it may stop and start."""
    server = SeaweedFS(tmp_path / "s3").start()
    try:
        on_bucket(server, settings_env)
        yield server
    finally:
        server.kill()


def on_bucket(server: SeaweedFS, settings_env: Callable[..., Any]) -> str:
    """Settings on a new bucket of ``server``, and :func:`with_running_job`; the bucket."""
    bucket = server.new_bucket()
    env = server.env(bucket, "lf")
    settings_env(storage_url=env["LORAFLEET_STORAGE_URL"],
                 s3_endpoint_url=env["LORAFLEET_S3_ENDPOINT_URL"], s3_path_style="true")
    with_running_job()
    return bucket


def with_running_job() -> None:
    """A migrated database holding one running job (attempt 2)."""
    from shared.migrate import upgrade

    upgrade()
    with session_scope() as s:
        s.add(Job(id=JOB, project="p", created_at=now(), model="m", status="running",
                  training_file="file-x", spec={}, seed=0, attempt=2))


def commit(tmp_path: Path, attempt: int, step: int, *, record: bool = True) -> str:
    """A checkpoint of ``attempt`` committed in storage (and recorded on the job's row)."""
    local = make_checkpoint(tmp_path / f"a{attempt}", step)
    key = storage.checkpoint_key(JOB, attempt, step)
    folders.commit_folder(storage.get_store(), local, key)
    if record:
        with session_scope() as s:
            s.add(Checkpoint(id=f"ftckpt-store-{step}", job_id=JOB, created_at=now(),
                             step_number=step, path=key, metrics={}, attempt=attempt))
    return key


# --------------------------------------------------------------------------- resuming
def test_resume_takes_the_last_recorded_checkpoint_checked(stored: str, tmp_path: Path) -> None:
    commit(tmp_path, 1, 4)
    last = commit(tmp_path, 1, 8)
    commit(tmp_path, 2, 12, record=False)  # committed, never recorded: no resume point

    point = checkpoints.resume_point(JOB, last, 8)

    assert point is not None and point[0] == 8
    assert (point[1] / "optimizer.pt").read_bytes() == b"x" * 18
    assert checkpoints.complete_checkpoint(point[1])


@pytest.mark.parametrize("damage", ["changed", "unmanifested", "deleted"])
def test_a_damaged_last_checkpoint_falls_back_to_an_older_one(stored: str, tmp_path: Path,
                                                              damage: str) -> None:
    store = storage.get_store()
    commit(tmp_path, 1, 4)
    last = commit(tmp_path, 1, 8)
    if damage == "changed":  # same size, other bytes: only the sha256 tells
        store.put_bytes(f"{last}/optimizer.pt", b"y" * 18)
    elif damage == "unmanifested":
        store.delete([f"{last}/{storage.MANIFEST}"])
    else:
        folders.delete_folder(store, last)

    point = checkpoints.resume_point(JOB, last, 8)

    assert point is not None and point[0] == 4


def test_no_resume_point_without_a_whole_checkpoint(stored: str, tmp_path: Path) -> None:
    last = commit(tmp_path, 1, 4)
    storage.get_store().delete([f"{last}/trainer_state.json"])

    assert checkpoints.resume_point(JOB, last, 4) is None
    assert checkpoints.resume_point(JOB, None, None) is None


# --------------------------------------------------------------------------- cleanup, retention
def test_what_earlier_attempts_left_unrecorded_is_deleted(stored: str, tmp_path: Path) -> None:
    store = storage.get_store()
    kept = commit(tmp_path, 1, 4)
    unrecorded = commit(tmp_path, 1, 6, record=False)
    uploaded = storage.checkpoint_key(JOB, 1, 8)  # a worker killed mid-upload
    store.put_bytes(f"{uploaded}/adapter_model.safetensors", b"half")
    writer = store.writer(f"{uploaded}/optimizer.pt")
    writer.write(b"o" * (9 << 20))  # parts sent, never completed
    mine = storage.checkpoint_key(JOB, 2, 10)
    store.put_bytes(f"{mine}/adapter_model.safetensors", b"mine")  # this attempt's, uploading

    removed = checkpoints.clean_store(store, JOB, 2, [kept])

    assert removed == [unrecorded, uploaded]
    assert folders.exists(store, kept)
    assert {k.rsplit("/", 1)[0] for k in store.list(storage.job_prefix(JOB))} == {kept, mine}
    assert store.abort_uploads(storage.job_prefix(JOB)) == 0


def test_retention_keeps_the_newest_and_the_best(stored: str, tmp_path: Path) -> None:
    keys = {step: commit(tmp_path, 1, step) for step in (2, 4, 6, 8)}

    deleted = checkpoints.apply_store_retention(storage.get_store(), JOB, keep=2, protect=[2])

    assert deleted == [4]
    assert [folders.exists(storage.get_store(), keys[s]) for s in (2, 4, 6, 8)] == [
        True, False, True, True]


def test_retention_leaves_for_later_what_a_store_away_keeps(own_store: SeaweedFS,
                                                             tmp_path: Path) -> None:
    keys = {step: commit(tmp_path, 1, step) for step in (2, 4, 6)}
    own_store.stop()

    away = checkpoints.apply_store_retention(storage.get_store(), JOB, keep=1)
    own_store.start()
    kept = [folders.exists(storage.get_store(), keys[s]) for s in (2, 4, 6)]
    later = checkpoints.apply_store_retention(storage.get_store(), JOB, keep=1)

    assert away == [] and kept == [True, True, True]  # nothing deleted, nothing raised
    assert later == [2, 4]
    assert [folders.exists(storage.get_store(), keys[s]) for s in (2, 4, 6)] == [
        False, False, True]


# --------------------------------------------------------------------------- committing
def info(path: Path, step: int) -> CheckpointInfo:
    return CheckpointInfo(step=step, path=path, train_loss=1.0, valid_loss=None)


def record(checkpoint: CheckpointInfo, key: str) -> None:
    lifecycle.record_checkpoint(JOB, 2, checkpoint.step, key, checkpoint.metrics())


def test_checkpoints_are_committed_recorded_and_leave_the_disk(stored: str,
                                                               tmp_path: Path) -> None:
    lost = threading.Event()
    committer = Committer(JOB, 2, record, lost)
    first = make_checkpoint(tmp_path / "work", 2)
    second = make_checkpoint(tmp_path / "work", 4)
    committer.submit(info(first, 2))
    committer.submit(info(second, 4))
    committer.drain()
    committer.close()

    assert [(r.step, r.attempt, r.key) for r in checkpoints.recorded(JOB)] == [
        (2, 2, storage.checkpoint_key(JOB, 2, 2)), (4, 2, storage.checkpoint_key(JOB, 2, 4))]
    manifest = folders.read_manifest(storage.get_store(), storage.checkpoint_key(JOB, 2, 4))
    assert storage.MANIFEST not in manifest.files and "optimizer.pt" in manifest.files
    assert not first.exists() and second.exists()  # older ones leave the worker's disk
    assert not lost.is_set()


def test_an_attempt_that_lost_its_lease_commits_nothing(stored: str, tmp_path: Path) -> None:
    with session_scope() as s:  # the sweeper gave the job to attempt 3
        s.execute(update(Job).where(Job.id == JOB).values(attempt=3))
    lost = threading.Event()
    committer = Committer(JOB, 2, record, lost)
    committer.submit(info(make_checkpoint(tmp_path / "work", 2), 2))

    with pytest.raises(LeaseLost):
        committer.drain()
    committer.close()

    assert lost.is_set()
    assert storage.get_store().list(storage.job_prefix(JOB)) == []  # uploaded, taken back
    assert checkpoints.recorded(JOB) == []


def test_a_commit_rides_out_a_store_that_is_away(own_store: SeaweedFS, tmp_path: Path) -> None:
    own_store.stop()
    committer = Committer(JOB, 2, record, threading.Event())
    committer.submit(info(make_checkpoint(tmp_path / "work", 2), 2))
    time.sleep(1.0)  # at least one failed try (retries back off from 0.5 s)
    assert checkpoints.recorded(JOB) == []
    own_store.start()
    committer.drain()
    committer.close()

    assert [r.step for r in checkpoints.recorded(JOB)] == [2]
    assert folders.exists(storage.get_store(), storage.checkpoint_key(JOB, 2, 2))
