"""Which LoRA adapters are loaded on a base model: an LRU bounded by count and bytes.

An adapter is known by its folder; its *version* is the identity of its weights file (inode,
size, modification time). The name it is loaded under is derived from both, so a new adapter
saved under the same folder is a different entry and old weights are never served for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from engine.adapter_folders import AdapterFolders
from shared.errors import NotFound
from shared.hermes import ToolFormat

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
META_FILE = "lorafleet.json"


@dataclass(frozen=True)
class AdapterRef:
    """One version of one adapter folder, and the peft adapter name it is loaded as."""

    path: str
    version: tuple[int, int, int]
    name: str
    size: int  # bytes of the weights file: the byte budget's estimate before loading


def adapter_ref(path: str | Path) -> AdapterRef:
    """The current version of the adapter in ``path``.

    Raises:
        NotFound: the folder holds no adapter weights (deleted, or never written).
    """
    folder = Path(path).resolve()
    for name in WEIGHT_FILES:
        try:
            st = os.stat(folder / name)
        except FileNotFoundError:
            continue
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        digest = hashlib.sha256(f"{folder}|{version}".encode()).hexdigest()[:16]
        # peft keeps adapters in ModuleDicts: the name must be a plain identifier.
        return AdapterRef(str(folder), version, f"lora_{digest}", st.st_size)
    raise NotFound(f"no adapter weights in {folder}", param="model", code="adapter_missing")


def served_adapter(path: str | None, folders: AdapterFolders | None) -> AdapterRef | None:
    """The adapter a request's target names (None: the base model), if it may be served.

    Args:
        folders: where adapters come from (the storage URL fetched to this node); None:
            ``path`` is a local folder.

    Raises:
        InvalidRequest: the URL is not in the engine's storage.
        NotFound: the folder holds no adapter weights.
    """
    if path is None:
        return None
    return adapter_ref(folders.local(path) if folders is not None else path)


def taught_tool_format(ref: AdapterRef | None) -> ToolFormat | None:
    """How the adapter was taught tools: the ``tool_format`` training stored in its
    ``lorafleet.json`` when its chats had tools (``modelio.chat_template``). None for the base
    model and for an adapter never trained on tools."""
    return None if ref is None else _stored_tool_format(ref.path, ref.name)


@functools.lru_cache(maxsize=1024)
def _stored_tool_format(path: str, name: str) -> ToolFormat | None:
    # ``name`` tells versions apart: a new adapter in the same folder is read again.
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    value = meta.get("tool_format") if isinstance(meta, dict) else None
    return value if value in get_args(ToolFormat) else None


@dataclass
class _Entry:
    ref: AdapterRef
    bytes: int


class AdapterCache:
    """LRU of loaded adapters. It decides; the caller's ``load``/``unload`` do the work.

    Only the engine's generation thread uses it, so it needs no lock.

    Args:
        max_count: most adapters loaded at once.
        max_bytes: most adapter weight bytes loaded at once.
        load: loads a ref into the model; returns the bytes it occupies there.
        unload: removes an adapter (by name) from the model.
    """

    def __init__(self, max_count: int, max_bytes: int, load: Callable[[AdapterRef], int],
                 unload: Callable[[str], None]):
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._load = load
        self._unload = unload
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def names(self) -> list[str]:
        """Loaded adapter names, least recently used first."""
        return list(self._entries)

    def ensure(self, refs: Iterable[AdapterRef]) -> dict[str, Exception]:
        """Make every ref loaded (for one batch), evicting the least recently used others.

        The refs of the batch are never evicted for each other; when they alone exceed the
        budget the batch still runs and the cache shrinks back on the next call.

        Returns:
            The refs that failed to load, by name, with their error: only their requests
            fail, the rest of the batch runs.
        """
        wanted = {r.name: r for r in refs}
        failed: dict[str, Exception] = {}
        self.drop_stale()
        for name, ref in wanted.items():
            if name in self._entries:
                self._entries.move_to_end(name)
                continue
            self._make_room(ref.size, keep=wanted.keys())
            try:
                adapter_ref(ref.path)  # NotFound if the folder went away since the request
                used = self._load(ref)
            except Exception as e:  # noqa: BLE001 - a deleted or broken adapter folder
                log.warning("could not load adapter %s: %s", ref.path, e)
                self._unload_partial(name)
                failed[name] = e
                continue
            self.loads += 1
            self._entries[name] = _Entry(ref, used)
        self._make_room(0, keep=wanted.keys())
        return failed

    def _unload_partial(self, name: str) -> None:
        # peft may have injected some layers before failing: take them out again.
        with contextlib.suppress(Exception):
            self._unload(name)

    def _make_room(self, incoming: int, keep: Iterable[str]) -> None:
        keep = set(keep)
        new = 1 if incoming else 0
        for name in list(self._entries):
            over_count = len(self._entries) + new > self.max_count
            over_bytes = self.bytes + incoming > self.max_bytes
            if not (over_count or over_bytes):
                return
            if name not in keep:
                self.evict(name)

    def evict(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            log.info("unloading adapter %s (%s)", name, entry.ref.path)
            self._unload(name)
            self.evictions += 1

    def drop_stale(self) -> list[str]:
        """Unload adapters whose folder was deleted or now holds other weights."""
        stale = []
        for name, entry in list(self._entries.items()):
            try:
                current = adapter_ref(entry.ref.path).name
            except NotFound:
                current = None
            if current != name:
                stale.append(name)
                self.evict(name)
        return stale

    def clear(self) -> None:
        for name in list(self._entries):
            self.evict(name)
