"""Complete checkpoints only.

On the worker's disk, the Trainer's checkpoint folder is renamed into place with a marker
written last (``checkpoint-N`` only ever exists complete). In storage, a checkpoint is
committed by its manifest (:mod:`shared.storage.folders`) under its attempt's own prefix
(``jobs/<job>/attempt-<n>/checkpoint-<step>``) and recorded on the job's row: the database
says which checkpoints a job has, and each one's manifest says which files it holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from shared import storage
from shared.db import session_scope
from shared.errors import StorageUnavailable
from shared.models import Checkpoint
from shared.storage import COMPLETE_MARKER, NodeCache, ObjectMissing, Store
from shared.storage.folders import DamagedFolder, Manifest, delete_folder

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# What transformers writes for a PEFT model; all must be present for a checkpoint to count.
REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json",
                  "optimizer.pt", "scheduler.pt")


def write_marker(path: Path, step: int) -> None:
    """Mark ``path`` complete. Called after transformers wrote everything, before the rename."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {', '.join(missing)}")
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    data = json.dumps({"step": step, "files": sizes, "written_at": time.time()})
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with tmp.open("w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)


def complete_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a finished checkpoint whose files match its marker (or, in a
    storage folder, its manifest) in size."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = Manifest.parse(marker.read_bytes(), str(path)).files
    except DamagedFolder:
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == entry.size
               for name, entry in files.items())


def step_of(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted((s, p) for s, p in found if s is not None and complete_checkpoint(p))


def clean_incomplete(root: Path) -> list[Path]:
    """Remove staging folders and checkpoint folders without a valid marker."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        stale = p.name.startswith((".staging-", ".trash-")) or (
            step_of(p) is not None and not complete_checkpoint(p))
        if p.is_dir() and stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def apply_retention(root: Path, keep: int,
                    protect: Path | Iterable[Path | None] | None = None) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints, never those in ``protect`` (the
    one just written, the best one); returns the deleted steps."""
    complete = list_complete(root)
    doomed = complete[:-keep] if keep > 0 else complete
    kept = {p.resolve() for p in ([protect] if isinstance(protect, Path) else protect or [])
            if p is not None}
    deleted = []
    for step, path in doomed:
        if path.resolve() in kept:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(step)
    return deleted


# --------------------------------------------------------------------------- in storage
@dataclass(frozen=True)
class Recorded:
    """A checkpoint the job's row lists (retention has not deleted it)."""

    step: int
    attempt: int
    key: str  # its folder in storage


def recorded(job_id: str) -> list[Recorded]:
    """The job's recorded checkpoints, oldest first (a step saved by two attempts: the later
    one last)."""
    with session_scope() as s:
        rows = s.execute(select(Checkpoint.step_number, Checkpoint.attempt, Checkpoint.path)
                         .where(Checkpoint.job_id == job_id, Checkpoint.deleted.is_(False))
                         .order_by(Checkpoint.step_number, Checkpoint.seq)).all()
    return [Recorded(step, attempt, path) for step, attempt, path in rows]


_ATTEMPT_FOLDER = re.compile(r"^(jobs/[^/]+/attempt-(\d+)/[^/]+)/")


def clean_store(store: Store, job_id: str, attempt: int, keep: Iterable[str]) -> list[str]:
    """Delete what earlier attempts of the job left in storage and no record names: folders
    without a manifest (a worker killed mid-upload), committed folders whose record never
    came (an attempt that lost its lease or died right after its commit), and the parts of
    unfinished uploads. Returns the folders deleted.

    Only earlier attempts are touched: this attempt holds the job's lease, so no later one
    exists, and an earlier one still writing has lost its lease (its commit is fenced).
    """
    kept = set(keep)
    doomed: set[str] = set()
    for key in store.list(storage.job_prefix(job_id)):
        m = _ATTEMPT_FOLDER.match(key)
        if m and int(m[2]) < attempt and m[1] not in kept:
            doomed.add(m[1])
    for folder in sorted(doomed):
        delete_folder(store, folder)
    store.abort_uploads(storage.job_prefix(job_id))
    return sorted(doomed)


def fetch_checkpoint(store: Store, cache: NodeCache, key: str) -> Path:
    """A recorded checkpoint as a local folder (fetched to the node's cache, or the stored
    folder itself on ``file://`` storage), every file checked against its manifest.

    Raises:
        ObjectMissing: no committed checkpoint there.
        DamagedFolder: a file is missing or not what the manifest says.
        StorageUnavailable: storage cannot be reached.
    """
    return cache.folder(store, key, verify=True)


def resume_point(job_id: str, last_good: str | None, last_good_step: int | None
                 ) -> tuple[int, Path] | None:
    """Where an attempt resumes: the job's last good checkpoint, fetched and checked; if it is
    gone or damaged, the newest older recorded one that is whole (better than starting over).

    Raises:
        StorageUnavailable: storage cannot be reached (the attempt is retried later).
    """
    if last_good is None:
        return None
    store, cache = storage.get_store(), storage.get_cache()
    older = [r for r in reversed(recorded(job_id)) if r.key != last_good
             and (last_good_step is None or r.step <= last_good_step)]
    candidates = [(last_good_step, last_good)] + [(r.step, r.key) for r in older]
    for step, key in candidates:
        try:
            path = fetch_checkpoint(store, cache, key)
        except (ObjectMissing, DamagedFolder) as e:
            log.warning("checkpoint %s of %s is gone or damaged (%s)", key, job_id, e)
            continue
        if step is None:
            step = int(json.loads((path / "trainer_state.json").read_text())["global_step"])
        return step, path
    return None


def apply_store_retention(store: Store, job_id: str, keep: int,
                          protect: Iterable[int | None] = ()) -> list[int]:
    """Delete from storage all but the newest ``keep`` recorded checkpoints of the job, never
    those of the steps in ``protect`` (the best one); returns the steps deleted, for the
    caller to mark (folders go first: a listed checkpoint never lacks its files for long).

    Retention is housekeeping: a store that stops answering ends the pass early (logged),
    and the steps not yet deleted stay recorded for the next pass (the next checkpoint's, or
    the end of training's), rather than failing the attempt.
    """
    rows = recorded(job_id)
    steps = sorted({r.step for r in rows})
    kept = set(steps[-keep:] if keep > 0 else []) | {p for p in protect if p is not None}
    deleted: list[int] = []
    try:
        for step in sorted(set(steps) - kept):
            for row in rows:
                if row.step == step:
                    delete_folder(store, row.key)
            deleted.append(step)
    except StorageUnavailable as e:
        log.warning("job %s: retention stopped, storage is away (%s); the next pass deletes "
                    "the older checkpoints", job_id, e)
    return deleted
