"""Complete checkpoints only: a marker written last, cleanup of leftovers, retention."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from shared.storage import COMPLETE_MARKER

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
    """True when ``path`` holds a finished checkpoint whose files match its marker."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size
               for name, size in files.items())


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
