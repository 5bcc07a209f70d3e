"""Folders put in a test's storage as a worker commits them (files, then their manifest)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path


def commit_files(key: str, files: Mapping[str, bytes | str]) -> str:
    """Commit a folder of ``files`` under ``key`` in this process's storage; returns ``key``."""
    from shared.storage import folders, get_store

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        folders.commit_folder(get_store(), Path(tmp), key)
    return key


def folder_gone(key: str) -> bool:
    """Whether nothing is left of a folder in this process's storage (no object under it)."""
    from shared.storage import folders, get_store

    return not folders.exists(get_store(), key) and get_store().list(key + "/") == []
