"""Adapters as the engine finds them: a request's ``adapter_path`` is a storage URL (a local
path on ``file://`` storage, ``s3://…`` on S3), fetched to this node's cache before it is
loaded, so the engine shares no folder with the workers that trained the adapter.

An adapter folder in storage never changes once committed (each attempt of a job writes its
own folder, and its manifest is created once), so a URL is fetched once per node and then
used from the cache; a cache entry evicted since is fetched again.
"""

from __future__ import annotations

import threading
from pathlib import Path

from shared.errors import InvalidRequest, NotFound
from shared.storage import NodeCache, ObjectMissing, Store
from shared.storage.folders import DamagedFolder

# What serving reads of an adapter's folder (a checkpoint's also holds the Trainer's state,
# which is never fetched for serving).
SERVED_FILES = ("adapter_config.json", "adapter_model.safetensors", "lorafleet.json")


class AdapterFolders:
    """Adapter URLs of ``store``, as local folders in ``cache``."""

    def __init__(self, store: Store, cache: NodeCache):
        self.store = store
        self.cache = cache
        self._local: dict[str, Path] = {}
        self._lock = threading.Lock()

    def local(self, url: str) -> Path:
        """The local folder of the adapter at ``url`` (fetched on first use).

        Raises:
            InvalidRequest: ``url`` is not in this engine's storage.
            NotFound: no committed adapter there (deleted, or never written), or one whose
                files do not match their manifest.
            StorageUnavailable: storage cannot be reached.
        """
        try:
            key = self.store.key_of(url)
        except ValueError:
            raise InvalidRequest("adapter_path is outside the storage", param="model") from None
        with self._lock:
            known = self._local.get(url)
        if known is not None and self.cache.touch(known):
            return known
        try:
            path = self.cache.folder(self.store, key, names=SERVED_FILES, legacy=True)
        except ObjectMissing:
            raise NotFound(f"no adapter at {url}", param="model",
                           code="adapter_missing") from None
        except DamagedFolder as e:
            raise NotFound(f"the adapter at {url} is damaged: {e}", param="model",
                           code="adapter_missing") from e
        with self._lock:
            self._local[url] = path
        return path
