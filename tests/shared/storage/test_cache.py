"""The node cache: objects fetched once and checked, named by content, evicted least recently
used first but never while in use, shared safely by several processes of a node; a local
store is used in place."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from shared.storage import NodeCache, ObjectMissing, Store, folders, make_store


def put(store: Store, key: str, data: bytes) -> str:
    store.put_bytes(key, data)
    return hashlib.sha256(data).hexdigest()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_file_is_fetched_once_and_checked(store: Store, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=1 << 20)
    digest = put(store, "files/f.jsonl", b'{"a": 1}\n')
    path = cache.file(store, "files/f.jsonl", digest)
    assert path.read_bytes() == b'{"a": 1}\n'
    assert cache.file(store, "files/f.jsonl", digest) == path
    if store.local_path("files/f.jsonl") is None:
        assert path.is_relative_to(cache.root)
        with pytest.raises(folders.DamagedFolder):
            cache.file(store, "files/f.jsonl", "0" * 64)
    else:  # a folder store: read in place, nothing copied
        assert path == store.local_path("files/f.jsonl")
        assert not (cache.root / "entries").exists()
    with pytest.raises(ObjectMissing):
        cache.file(store, "files/none.jsonl", "1" * 64)


def test_a_folder_is_fetched_by_its_manifest(store: Store, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=1 << 20)
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (source / "optimizer.pt").write_bytes(b"o" * 200)
    folders.commit_folder(store, source, "jobs/j/attempt-1/checkpoint-3")
    local = cache.folder(store, "jobs/j/attempt-1/checkpoint-3",
                         names=["adapter_model.safetensors"], verify=True)
    assert (local / "adapter_model.safetensors").read_bytes() == b"w" * 100
    if store.local_path("x") is None:
        assert not (local / "optimizer.pt").exists()  # only what was asked for
    with pytest.raises(ObjectMissing):
        cache.folder(store, "jobs/j/attempt-1/checkpoint-9")


def test_least_recently_used_entries_go_first_but_not_while_in_use(tmp_path: Path) -> None:
    remote = make_store(f"file://{tmp_path / 'remote'}")
    # A store that is not local to this node, as an S3 bucket is not.
    remote.local_path = lambda key: None  # type: ignore[method-assign]
    cache = NodeCache(tmp_path / "cache", max_bytes=2500)
    a = cache.file(remote, "a", put(remote, "a", b"a" * 1000))
    b = cache.file(remote, "b", put(remote, "b", b"b" * 1000))
    age(a, 300)
    age(b, 200)
    cache.file(remote, "a", hashlib.sha256(b"a" * 1000).hexdigest())  # a is used again
    c = cache.file(remote, "c", put(remote, "c", b"c" * 1000))
    assert a.exists() and c.exists() and not b.exists()  # b was the least recently used
    d = cache.file(remote, "d", put(remote, "d", b"d" * 1000))
    # a and c were used within the pin window: kept, over the limit, rather than pulled away.
    assert a.exists() and c.exists() and d.exists()


def _fetch(args: tuple[str, str, str]) -> str:
    root, remote_root, digest = args
    remote = make_store(f"file://{remote_root}")
    remote.local_path = lambda key: None  # type: ignore[method-assign]
    return str(NodeCache(Path(root), 1 << 30).file(remote, "big", digest))


def test_processes_of_a_node_share_the_cache(tmp_path: Path) -> None:
    remote = make_store(f"file://{tmp_path / 'remote'}")
    digest = put(remote, "big", os.urandom(1 << 20))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_fetch, [(str(tmp_path / "cache"), str(tmp_path / "remote"),
                                   digest)] * 8)
    assert len(set(paths)) == 1
    assert hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest() == digest
    assert [p.name for p in (tmp_path / "cache" / "entries").iterdir()] == [f"file-{digest}"]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
