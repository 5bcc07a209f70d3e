"""Folders in storage, committed by a manifest: a checkpoint, an adapter, a cached data set.

A folder's files are uploaded first (in parallel); then its manifest, which lists every file
with its size and sha256, is written under ``<folder>/lorafleet-complete.json`` with a
conditional create. **A folder exists if and only if its manifest does**: a writer killed
mid-upload leaves files without a manifest, which no reader uses (and the next attempt's
cleanup deletes), and readers check every file they download against the manifest.

Readers never list a folder to learn what it holds: the manifest says it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.storage.base import ObjectMissing, Store, join

# The manifest's name inside its folder. Before folders were committed this way, a marker of
# the same name listed a checkpoint's files with their sizes only; such markers still read.
MANIFEST = "lorafleet-complete.json"
UPLOAD_THREADS = 4
HASH_CHUNK = 1 << 20


class DamagedFolder(Exception):
    """A folder's manifest is unreadable, or a file does not match it."""


class AlreadyCommitted(Exception):
    """Another writer committed the folder first, with other files."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str | None  # None: a marker written before manifests had digests


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    # Where the files lie, relative to the folder: "" (in it), or a writer's own subfolder
    # when several writers may commit the same folder (see :func:`commit_folder`).
    base: str = ""

    def to_json(self) -> bytes:
        return json.dumps({
            "files": {n: {"size": e.size, "sha256": e.sha256} for n, e in self.files.items()},
            "base": self.base, "meta": self.meta, "written_at": time.time(),
        }, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """Raises :class:`DamagedFolder` for anything but a manifest (or an old marker)."""
        try:
            raw = json.loads(data)
            files = {}
            for name, entry in raw["files"].items():
                _check_name(name)
                if isinstance(entry, int):  # an old marker: {name: size}
                    files[name] = FileEntry(entry, None)
                else:
                    files[name] = FileEntry(int(entry["size"]), str(entry["sha256"]))
            base = str(raw.get("base") or "")
            meta = raw.get("meta") or {k: v for k, v in raw.items()
                                       if k not in ("files", "base", "written_at")}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFolder(f"the manifest of {where} is not readable: {e}") from e
        return cls(files, meta, base)

    def key(self, folder: str, name: str) -> str:
        return join(folder, self.base, name)


def _check_name(name: str) -> None:
    if not name or name.startswith("/") or ".." in name.split("/") or name == MANIFEST:
        raise ValueError(f"bad file name {name!r} in a manifest")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: Path) -> list[str]:
    """The files of a local folder, as relative names (``train/data.arrow``), its marker or
    manifest left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def commit_folder(store: Store, source: Path, folder: str, *,
                  meta: dict[str, Any] | None = None, base: str = "",
                  names: Iterable[str] | None = None,
                  before_commit: Callable[[], None] | None = None) -> Manifest:
    """Upload the files of ``source`` under ``folder`` (several at once), then commit the
    folder by creating its manifest, unless it exists.

    Args:
        base: a subfolder of ``folder`` for the files, unique to this writer, where several
            writers may commit the same folder (a data set two attempts build): the loser's
            files then never overwrite the winner's.
        names: the files to commit (default: every file of ``source``).
        before_commit: called once the files are uploaded, right before the manifest is
            created; an exception there commits nothing (a fence: see
            :mod:`worker.commits`).

    Returns:
        The folder's manifest: this writer's, or an identical one committed before (a retry
        of a commit whose answer was lost).

    Raises:
        AlreadyCommitted: another manifest with other files is there (this writer's files
            under ``base`` are deleted again).
        StorageUnavailable: the store cannot be reached (nothing is committed).
    """
    names = sorted(names) if names is not None else local_files(source)
    for name in names:
        _check_name(name)
    manifest = Manifest({}, meta or {}, base)

    def upload(name: str) -> tuple[str, FileEntry]:
        path = source / name
        entry = FileEntry(path.stat().st_size, sha256_of(path))
        store.upload_file(path, manifest.key(folder, name))
        return name, entry

    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="commit") as pool:
        files = dict(pool.map(upload, names))
    manifest = Manifest(files, manifest.meta, base)
    if before_commit is not None:
        before_commit()
    if store.create(join(folder, MANIFEST), manifest.to_json()):
        return manifest
    existing = read_manifest(store, folder)
    if existing.files == manifest.files:
        return existing
    if base:
        store.delete(manifest.key(folder, n) for n in names)
    raise AlreadyCommitted(f"{store.url(folder)} was committed by another writer")


def read_manifest(store: Store, folder: str) -> Manifest:
    """The manifest of a committed folder.

    Raises:
        ObjectMissing: the folder was never committed, or was deleted.
        DamagedFolder: the manifest is not readable.
    """
    return Manifest.parse(store.get_bytes(join(folder, MANIFEST)), store.url(folder))


def exists(store: Store, folder: str) -> bool:
    """Whether ``folder`` is committed (its manifest is there)."""
    return store.exists(join(folder, MANIFEST))


def verify_file(path: Path, entry: FileEntry, where: str) -> None:
    """Raises :class:`DamagedFolder` unless ``path`` has the entry's size and digest."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DamagedFolder(f"{where} is missing") from None
    if size != entry.size:
        raise DamagedFolder(f"{where} has {size} bytes, its manifest says {entry.size}")
    if entry.sha256 is not None and sha256_of(path) != entry.sha256:
        raise DamagedFolder(f"{where} does not match the sha256 of its manifest")


def verify_local(folder: Path, manifest: Manifest, names: Iterable[str] | None = None) -> None:
    """Check the files of a folder on disk against ``manifest``."""
    for name in (names if names is not None else manifest.files):
        verify_file(folder / manifest.base / name, manifest.files[name], f"{folder}/{name}")


def download_folder(store: Store, folder: str, dest: Path, manifest: Manifest,
                    names: Iterable[str] | None = None) -> None:
    """Download the files of a committed folder into ``dest`` (several at once) and check
    each against the manifest.

    Raises:
        DamagedFolder: a file is missing from the store or does not match its manifest.
        StorageUnavailable: the store cannot be reached.
    """
    wanted = sorted(names) if names is not None else sorted(manifest.files)

    def fetch(name: str) -> None:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download_file(manifest.key(folder, name), target)
        except ObjectMissing:
            raise DamagedFolder(f"{store.url(folder)}/{name} is listed in its manifest but "
                                "missing") from None
        verify_file(target, manifest.files[name], f"{store.url(folder)}/{name}")

    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="fetch") as pool:
        list(pool.map(fetch, wanted))


def delete_folder(store: Store, folder: str) -> None:
    """Delete a folder: its manifest first (from then on it does not exist), then every object
    and unfinished upload under it."""
    store.delete([join(folder, MANIFEST)])
    store.delete_prefix(folder + "/")
