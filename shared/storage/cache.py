"""The node's cache of objects fetched from storage (``LORAFLEET_CACHE_DIR``).

Workers fetch their training files and the checkpoint they resume from here; the inference
engine fetches adapters here before it loads them. Entries are named by content (a file by its
sha256, a folder by its manifest's), so an entry never changes once it is there, and several
processes of the node can share the folder: each fetches into a temporary folder and renames
the entry into place (the first rename wins, a later one is dropped), and eviction holds a lock
file.

Eviction is least recently used (each use touches the entry) down to ``max_bytes``; an entry
used within the last :data:`PIN_SECONDS` is kept even over the limit, so that a file about to
be opened is never taken away from its reader.

Where the store is a local folder (``file://``), nothing is copied: readers get the stored
file or folder itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.storage import folders
from shared.storage.base import ObjectMissing, Store

log = logging.getLogger(__name__)

PIN_SECONDS = 60.0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class NodeCache:
    """Objects of ``store`` fetched to this node, under ``root``, at most ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"NodeCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ fetching
    def file(self, store: Store, key: str, sha256: str) -> Path:
        """A local copy of the object ``key``, whose content has ``sha256``.

        Raises:
            ObjectMissing: no such object.
            DamagedFolder: the object's content does not have ``sha256``.
            StorageUnavailable: the store cannot be reached.
        """
        local = store.local_path(key)
        if local is not None:
            if not local.is_file():
                raise ObjectMissing(key)
            return local
        entry = self.entries / f"file-{sha256}"
        if self._hit(entry):
            return entry
        with self._scratch() as work:
            target = work / "content"
            store.download_file(key, target)
            actual = folders.sha256_of(target)
            if actual != sha256:
                raise folders.DamagedFolder(f"{store.url(key)} has sha256 {actual}, expected "
                                            f"{sha256}")
            return self._publish(target, entry)

    def folder(self, store: Store, key: str, *, names: Iterable[str] | None = None,
               verify: bool = False, legacy: bool = False) -> Path:
        """A local copy of the committed folder ``key`` (only those of ``names`` that its
        manifest lists, if given), each file checked against the folder's manifest.

        Args:
            verify: also check the files of a folder used in place (a ``file://`` store),
                where no download checked them.
            legacy: a folder of a ``file://`` store without a manifest is used as it is: an
                adapter written before folders had manifests, which the database records as
                complete. (Never pass it for a folder that may be mid-upload.)

        Raises:
            ObjectMissing: the folder is not committed (or was deleted).
            DamagedFolder: a file is missing or does not match the manifest.
            StorageUnavailable: the store cannot be reached.
        """
        local = store.local_path(key)
        if local is not None:
            try:
                manifest = folders.read_manifest(store, key)
            except ObjectMissing:
                if legacy and local.is_dir():
                    return local
                raise
            if verify:
                folders.verify_local(local, manifest, None if names is None else
                                     set(names) & set(manifest.files))
            return local / manifest.base if manifest.base else local
        manifest = folders.read_manifest(store, key)
        wanted = sorted(manifest.files if names is None else set(names) & set(manifest.files))
        digest = hashlib.sha256(repr(sorted(
            (n, manifest.files[n].size, manifest.files[n].sha256) for n in wanted)).encode())
        entry = self.entries / f"folder-{digest.hexdigest()[:40]}"
        if self._hit(entry):
            return entry
        with self._scratch() as work:
            target = work / "folder"
            target.mkdir()
            folders.download_folder(store, key, target, manifest, wanted)
            # The copy describes itself: a manifest of the files it holds.
            fetched = folders.Manifest({n: manifest.files[n] for n in wanted}, manifest.meta)
            (target / folders.MANIFEST).write_bytes(fetched.to_json())
            return self._publish(target, entry)

    def touch(self, path: Path) -> bool:
        """Mark a path this cache returned as used now; False if it is gone (evicted). A path
        in a local store is not the cache's, and only checked."""
        if path.is_relative_to(self.entries):
            return self._hit(path)
        return path.exists()

    def workspace(self, *parts: str) -> Path:
        """A folder of this node for a job's working files (the Trainer's checkpoints before
        they are committed): not an entry, never evicted; its owner removes it."""
        path = self.root.joinpath("work", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ entries
    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A fresh folder for one fetch, removed after it (its result renamed away first)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _hit(self, entry: Path) -> bool:
        try:
            os.utime(entry)  # the LRU clock
        except FileNotFoundError:
            return False
        return True

    def _publish(self, source: Path, entry: Path) -> Path:
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, entry)  # a folder renamed onto a non-empty one fails
        except OSError:
            if not entry.exists():
                raise
            os.utime(entry)  # another process of the node fetched it first
        else:
            os.utime(entry)
        self.evict(keep=entry)
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries until the cache fits ``max_bytes``
        (entries used within :data:`PIN_SECONDS`, and ``keep``, stay). Returns what went."""
        removed: list[Path] = []
        with self._locked():
            if not self.entries.is_dir():
                return removed
            found = []
            for entry in self.entries.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat().st_mtime, entry, _size(entry)))
            total = sum(size for _, _, size in found)
            now = time.time()
            for used, entry, size in sorted(found, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if entry == keep or now - used < PIN_SECONDS:
                    continue
                trash = self.tmp / f"evicted-{uuid.uuid4().hex}"
                self.tmp.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry, trash)  # gone at once for readers, deleted after
                    shutil.rmtree(trash, ignore_errors=True)
                    trash.unlink(missing_ok=True)
                    total -= size
                    removed.append(entry)
            if total > self.max_bytes:
                log.info("node cache %s holds %d bytes, over its limit of %d: every entry is "
                         "in use", self.root, total, self.max_bytes)
        self.clean_tmp()
        return removed

    def clean_tmp(self, older_than: float = 3600.0) -> None:
        """Remove temporary folders of fetches that a killed process left."""
        if not self.tmp.is_dir():
            return
        cutoff = time.time() - older_than
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
