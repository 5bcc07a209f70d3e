"""Where the service keeps every byte it stores, and the names of things there.

One store per process, chosen here from ``LORAFLEET_STORAGE_URL`` (:func:`get_store`):
``file:///…`` (:class:`~shared.storage.local.FileStore`) or ``s3://bucket/prefix``
(:class:`~shared.storage.s3.S3Store`); callers never ask which. Keys (every one derived from
ids the service generated)::

    files/<file id>.jsonl                    an upload (a results file: .csv)
    jobs/<job id>/attempt-<n>/checkpoint-<step>/   a checkpoint, committed by its manifest
    jobs/<job id>/attempt-<n>/adapter/       a job's final adapter, committed by its manifest
    cache/datasets/<file sha256>/<fingerprint>/   a tokenized data set, committed by its
                                             manifest (deleted with its training file)

An attempt writes only under its own ``attempt-<n>/``, so no attempt ever overwrites
another's objects: one that lost its lease can at worst leave a folder that its job's next
attempt deletes (see :mod:`worker.checkpoints`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from shared.settings import get_settings
from shared.storage.base import ObjectMissing, Store, StoreWriter, join
from shared.storage.cache import NodeCache
from shared.storage.folders import MANIFEST

__all__ = ["COMPLETE_MARKER", "MANIFEST", "NodeCache", "ObjectMissing", "Store", "StoreWriter",
           "adapter_key", "attempt_prefix", "checkpoint_key", "dataset_cache_key",
           "dataset_cache_prefix", "file_key",
           "get_cache", "get_store", "job_prefix", "join", "local_folder", "make_store",
           "parse_checkpoint_key"]

# A committed folder's manifest; a checkpoint folder that has it is complete.
COMPLETE_MARKER = MANIFEST

_CHECKPOINT_KEY = re.compile(r"^jobs/(?P<job>[^/]+)/attempt-(?P<attempt>\d+)/"
                             r"checkpoint-(?P<step>\d+)$")


def make_store(url: str, *, endpoint_url: str = "", path_style: bool = False) -> Store:
    """The store of a storage URL.

    Raises:
        ValueError: neither ``file://`` nor ``s3://``.
    """
    if url.startswith("file://"):
        from shared.storage.local import FileStore

        return FileStore(Path(url[len("file://"):]))
    if url.startswith("s3://"):
        from shared.storage.s3 import S3Store, parse_url

        bucket, prefix = parse_url(url)
        return S3Store(bucket, prefix, endpoint_url=endpoint_url or None, path_style=path_style)
    raise ValueError(f"storage URL {url!r}: expected file:///path or s3://bucket/prefix")


@lru_cache(maxsize=8)
def _store(url: str, endpoint_url: str, path_style: bool) -> Store:
    return make_store(url, endpoint_url=endpoint_url, path_style=path_style)


def get_store() -> Store:
    """This process's store, as the settings say."""
    s = get_settings()
    return _store(s.effective_storage_url, s.s3_endpoint_url, s.s3_path_style)


@lru_cache(maxsize=8)
def _cache(root: Path, max_bytes: int) -> NodeCache:
    return NodeCache(root, max_bytes)


def get_cache() -> NodeCache:
    """This node's cache (``LORAFLEET_CACHE_DIR``)."""
    s = get_settings()
    return _cache(s.cache_dir.resolve(), s.cache_max_bytes)


# --------------------------------------------------------------------------- keys
def file_key(file_id: str, suffix: str = ".jsonl") -> str:
    return f"files/{file_id}{suffix}"


def job_prefix(job_id: str) -> str:
    """Everything of one job lies under this (with its trailing ``/``)."""
    return f"jobs/{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    return f"jobs/{job_id}/attempt-{attempt}"


def checkpoint_key(job_id: str, attempt: int, step: int) -> str:
    return f"{attempt_prefix(job_id, attempt)}/checkpoint-{step}"


def adapter_key(job_id: str, attempt: int) -> str:
    """The final adapter (PEFT layout, plus ``lorafleet.json``) of one attempt of a job."""
    return f"{attempt_prefix(job_id, attempt)}/adapter"


def dataset_cache_prefix(train_sha256: str) -> str:
    """The tokenized data sets built from one training file's content (with its trailing
    ``/``): deleted with the last file of that content."""
    return f"cache/datasets/{train_sha256}/"


def dataset_cache_key(train_sha256: str, fingerprint: str) -> str:
    return dataset_cache_prefix(train_sha256) + fingerprint


def parse_checkpoint_key(key: str) -> tuple[str, int, int] | None:
    """``(job id, attempt, step)`` of a :func:`checkpoint_key`; None for another key."""
    m = _CHECKPOINT_KEY.match(key)
    return (m["job"], int(m["attempt"]), int(m["step"])) if m else None


def local_folder(*parts: str) -> Path:
    """A folder of this node for files that are not objects (a job's W&B offline run, for
    ``wandb sync``; the vLLM servers' logs): ``parts`` under the storage folder where storage
    is a local folder, else under the node cache's workspace."""
    local = get_store().local_path(join(*parts))
    if local is None:
        return get_cache().workspace(*parts)
    local.mkdir(parents=True, exist_ok=True)
    return local
