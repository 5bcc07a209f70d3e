"""The storage interface, on a folder and on S3 alike: whole writes, conditional creates,
streamed writes in parts that leave nothing when aborted, listings, deletion, and an
unreachable store reported as such."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from shared.errors import StorageUnavailable
from shared.storage import ObjectMissing, Store, make_store
from shared.storage.s3 import PART_BYTES


def test_small_objects_are_written_read_and_replaced_whole(store: Store) -> None:
    store.put_bytes("first", b"")
    store.check()  # answers and can be written
    assert not store.exists("a/b.json")
    store.put_bytes("a/b.json", b"one")
    store.put_bytes("a/b.json", b"two")
    assert store.exists("a/b.json") and store.get_bytes("a/b.json") == b"two"
    assert not store.exists("a")  # a "folder" is no object
    with pytest.raises(ObjectMissing):
        store.get_bytes("a/missing")
    with pytest.raises(ObjectMissing):
        store.open_read("a/missing")


def test_conditional_create_has_exactly_one_winner(store: Store) -> None:
    assert store.create("m/manifest.json", b"first")
    assert not store.create("m/manifest.json", b"second")
    assert store.get_bytes("m/manifest.json") == b"first"


def test_urls_map_back_to_keys_inside_the_store_only(store: Store) -> None:
    url = store.url("jobs/j1/adapter")
    assert store.key_of(url) == "jobs/j1/adapter"
    outside = url.replace("jobs/j1/adapter", "../elsewhere/x") if url.startswith("/") \
        else url.replace(url.split("/")[2], "another-bucket")
    with pytest.raises(ValueError):
        store.key_of(outside)


def test_streamed_write_in_parts_is_invisible_until_committed(store: Store) -> None:
    data = os.urandom(2 * PART_BYTES + 12345)  # three parts on S3
    writer = store.writer("files/big.bin")
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start:start + (1 << 20)])
    assert not store.exists("files/big.bin")
    writer.commit()
    with store.open_read("files/big.bin") as f:
        got = f.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert b"".join(store.read_chunks("files/big.bin")) == data


def test_aborted_streamed_write_leaves_no_object_and_no_parts(store: Store) -> None:
    with pytest.raises(RuntimeError), store.writer("files/gone.bin") as writer:
        writer.write(os.urandom(PART_BYTES + 1))  # one part sent already on S3
        raise RuntimeError("the upload failed validation")
    assert not store.exists("files/gone.bin")
    assert store.list("files/") == []
    assert store.abort_uploads("files/") == 0  # nothing left to abort


def test_abandoned_parts_are_dropped_by_abort_uploads(store: Store) -> None:
    writer = store.writer("jobs/j/attempt-1/checkpoint-5/optimizer.pt")
    writer.write(os.urandom(PART_BYTES + 1))  # a worker killed here: never committed
    assert store.abort_uploads("jobs/j/") == 1
    assert store.abort_uploads("jobs/j/") == 0


def test_files_upload_and_download_whole(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(PART_BYTES + 77))
    store.upload_file(source, "x/weights.bin")
    target = tmp_path / "out" / "weights.bin"
    store.download_file("x/weights.bin", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(ObjectMissing):
        store.download_file("x/nothing", tmp_path / "out" / "nothing")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["weights.bin"]


def test_listing_and_deletion_by_prefix(store: Store) -> None:
    for key in ("jobs/a/1", "jobs/a/sub/2", "jobs/ab/3", "files/f"):
        store.put_bytes(key, b"x")
    assert store.list("jobs/a/") == ["jobs/a/1", "jobs/a/sub/2"]
    assert store.list("jobs/a") == ["jobs/a/1", "jobs/a/sub/2", "jobs/ab/3"]
    assert store.delete_prefix("jobs/a/") == 2
    assert store.list("jobs/") == ["jobs/ab/3"]
    store.delete(["jobs/ab/3", "never/there"])
    assert store.list("") == ["files/f"]


def test_a_store_nobody_answers_is_unavailable(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.processes import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    down = make_store("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{free_port()}",
                      path_style=True)
    for call in (down.check, lambda: down.get_bytes("k"), lambda: down.exists("k"),
                 lambda: down.create("k", b"x"), lambda: down.list("p/"),
                 lambda: down.upload_file(tmp_path / "f", "k")):
        (tmp_path / "f").write_bytes(b"x")
        with pytest.raises(StorageUnavailable):
            call()


def test_a_folder_that_cannot_be_written_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    store = make_store(f"file://{blocker}")
    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put_bytes("files/x", b"data")
