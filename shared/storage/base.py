"""The storage interface: a flat space of objects named by ``/``-separated keys.

Two backends implement it (``local.FileStore``: a folder; ``s3.S3Store``: an S3-compatible
bucket), chosen in one place (:func:`shared.storage.get_store`). Callers never learn which:
they write, read, list and delete keys, and commit folders with a manifest
(:mod:`shared.storage.folders`).

Guarantees both backends give:

* a write is all or nothing: readers see the old object, the whole new one, or none;
* :meth:`Store.create` is a conditional create (``If-None-Match: *``): of several writers of
  one key exactly one wins, and the others learn it;
* :meth:`Store.exists` asks about one exact key. Listings (:meth:`Store.list`) serve cleanup
  and deletion only, never existence: an S3 server may list a "folder" for minutes after its
  last object went.

Errors: a key that is not there raises :class:`ObjectMissing`; a store that cannot be
reached (connection refused, timeouts, 5xx answers after the client's retries, a folder that
cannot be written) raises :class:`shared.errors.StorageUnavailable`, which the API answers 503.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class ObjectMissing(KeyError):
    """No object under the key (never written, or deleted)."""


class StoreWriter(ABC):
    """A streamed write of one object: :meth:`write` chunks as they come (sent on in parts,
    never held whole), then :meth:`commit`; until then, nothing is visible under the key.
    Used as a context manager, an exception aborts the write and leaves nothing behind."""

    @abstractmethod
    def write(self, data: bytes | bytearray) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the object visible under its key, whole."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written (idempotent; a no-op after :meth:`commit`)."""

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


class Store(ABC):
    """Objects under keys. Keys are relative (``files/file-1.jsonl``), never start with
    ``/`` and never hold ``..``: every key is derived from ids the service generated."""

    @abstractmethod
    def url(self, key: str) -> str:
        """Where ``key`` lies, as users see it: a local path (file store) or ``s3://…``."""

    @abstractmethod
    def key_of(self, url: str) -> str:
        """The key of a :meth:`url` of this store.

        Raises:
            ValueError: ``url`` is not inside this store.
        """

    def local_path(self, key: str) -> Path | None:
        """The path of ``key`` on this node's disk, where the store is a local folder (then
        readers use it in place instead of a copy); None for a remote store."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raises :class:`~shared.errors.StorageUnavailable` unless the store answers and
        can be written (``/health``)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) a small object whole."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write a small object unless one exists under ``key`` (``If-None-Match: *``).
        Returns whether this call created it."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """A small object's content. Raises :class:`ObjectMissing`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under exactly ``key``."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A stream of the object's bytes (opened now: a missing key raises
        :class:`ObjectMissing` here, not while reading)."""

    @abstractmethod
    def writer(self, key: str) -> StoreWriter:
        """A streamed write of ``key`` (see :class:`StoreWriter`)."""

    @abstractmethod
    def upload_file(self, path: Path, key: str) -> None:
        """Store the file at ``path`` under ``key`` (large files in parallel parts)."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None:
        """Write the object to ``path`` (replaced whole; a failed download leaves nothing)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix``: for cleanup and deletion, never to decide existence."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects (missing ones are fine)."""

    @abstractmethod
    def abort_uploads(self, prefix: str) -> int:
        """Drop the unfinished streamed writes under ``prefix`` that a killed writer left
        (their parts); returns how many."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a folder, with a trailing ``/``) and the
        unfinished writes there; returns how many objects."""
        keys = self.list(prefix)
        self.delete(keys)
        self.abort_uploads(prefix)
        return len(keys)

    def read_chunks(self, key: str, size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks (opened at once: see :meth:`open_read`)."""
        stream = self.open_read(key)

        def chunks() -> Iterator[bytes]:
            with stream:
                while chunk := stream.read(size):
                    yield chunk

        return chunks()


def join(*parts: str) -> str:
    """A key from parts: ``join("jobs", "j1/", "adapter")`` is ``jobs/j1/adapter``."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
