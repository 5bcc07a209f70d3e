"""The file store: objects are files under one folder, which every process of the
deployment sees at the same path (one machine, or a shared mount such as NFS).

Every write goes to a hidden temporary file beside its target and is renamed into place, so a
reader sees a whole file or none; a conditional create links the temporary file to its name,
which fails if the name exists (atomic on POSIX file systems, NFS included)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from shared.errors import StorageUnavailable
from shared.storage.base import ObjectMissing, Store, StoreWriter

TEMP_SUFFIX = ".lf-part"


@contextlib.contextmanager
def _errors(what: str, *, write: bool = False) -> Iterator[None]:
    """A folder that cannot be read or written (full, gone, a stale mount) is an unavailable
    store; a file missing where one is read is a missing object."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        if write:
            raise StorageUnavailable(f"the storage folder cannot be written ({what}): "
                                     f"{e}") from e
        raise ObjectMissing(what) from e
    except OSError as e:
        raise StorageUnavailable(f"the storage folder cannot be used ({what}): {e}") from e


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def _fsync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists (``O_EXCL``): readers may see it short
    while it is written, which a manifest reader takes for a damaged manifest."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


class _FileWriter(StoreWriter):
    def __init__(self, path: Path):
        self.path = path
        with _errors(str(path), write=True):
            self.tmp = _temp_beside(path)
            self.file: BinaryIO | None = self.tmp.open("wb")

    def write(self, data: bytes | bytearray) -> None:
        assert self.file is not None, "write after commit or abort"
        with _errors(str(self.path), write=True):
            self.file.write(data)

    def commit(self) -> None:
        assert self.file is not None, "commit after commit or abort"
        with _errors(str(self.path), write=True):
            _fsync_close(self.file)
            self.file = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.tmp.unlink(missing_ok=True)


class FileStore(Store):
    """Objects as files under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key

    def url(self, key: str) -> str:
        return str(self._path(key))

    def key_of(self, url: str) -> str:
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"{url} is outside the storage folder {self.root}")
        return path.relative_to(self.root).as_posix()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise StorageUnavailable(f"the storage folder {self.root} is missing or not "
                                     "writable")

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as w:
            w.write(data)
            w.commit()

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with _errors(key, write=True):
            tmp = _temp_beside(path)
            try:
                with tmp.open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # fails if the name exists: the conditional create
                except FileExistsError:
                    return False
                except OSError as e:  # a file system without hard links
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                        raise
                    return _create_exclusive(path, data)
                return True
            finally:
                tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        with _errors(key):
            return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        with _errors(key):
            return self._path(key).is_file()

    def open_read(self, key: str) -> BinaryIO:
        with _errors(key):
            return self._path(key).open("rb")

    def writer(self, key: str) -> StoreWriter:
        return _FileWriter(self._path(key))

    def upload_file(self, path: Path, key: str) -> None:
        target = self._path(key)
        path.stat()  # a missing source is the caller's error, not the store's
        with _errors(key, write=True):
            tmp = _temp_beside(target)
            try:
                try:  # same file system: a second name for the file, no copy
                    os.link(path, tmp)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

    def download_file(self, key: str, path: Path) -> None:
        with _errors(key):
            tmp = _temp_beside(path)
            try:
                shutil.copyfile(self._path(key), tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, path) of the files under ``prefix``, temporary files included."""
        base = self._path(prefix) if prefix.endswith("/") else self._path(prefix).parent
        if not base.is_dir():
            return
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def list(self, prefix: str) -> list[str]:
        with _errors(prefix):
            return sorted(key for key, path in self._walk(prefix)
                          if not path.name.endswith(TEMP_SUFFIX))

    def delete(self, keys: Iterable[str]) -> None:
        parents: set[Path] = set()
        with _errors("delete"):
            for key in keys:
                path = self._path(key)
                path.unlink(missing_ok=True)
                parents.add(path.parent)
        self._prune(parents)

    def _prune(self, folders: Iterable[Path]) -> None:
        """Remove folders left empty, up to the root: a deleted folder leaves no trace."""
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def abort_uploads(self, prefix: str) -> int:
        stale = [path for _key, path in self._walk(prefix) if path.name.endswith(TEMP_SUFFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        self._prune({p.parent for p in stale})
        return len(stale)
