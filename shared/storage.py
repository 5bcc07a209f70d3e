"""Where things live in shared storage. Every path is derived here, from ids we generated."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.settings import get_settings

# Written last into a checkpoint folder, listing its files: a folder without it is not a
# checkpoint (an interrupted save). Workers write it; the engine checks for it.
COMPLETE_MARKER = "lorafleet-complete.json"


def root() -> Path:
    return get_settings().storage_dir.resolve()


def file_path(file_id: str) -> Path:
    return root() / "files" / f"{file_id}.jsonl"


def job_dir(job_id: str) -> Path:
    return root() / "jobs" / job_id


def checkpoints_dir(job_id: str) -> Path:
    return job_dir(job_id) / "checkpoints"


def adapter_dir(job_id: str) -> Path:
    """The final adapter in standard PEFT layout; its path contains the job id."""
    return job_dir(job_id) / "adapter"


def dataset_cache_dir(fingerprint: str) -> Path:
    return root() / "cache" / "datasets" / fingerprint


def relative(path: Path) -> str:
    return str(path.resolve().relative_to(root()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
