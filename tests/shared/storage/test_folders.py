"""Folders committed by a manifest: a folder exists iff its manifest does, every file is
checked against its size and sha256, a second writer never replaces the first's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.storage import MANIFEST, ObjectMissing, Store, folders


def make_folder(root: Path, content: dict[str, bytes]) -> Path:
    for name, data in content.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


FILES = {"adapter_model.safetensors": b"w" * 1000, "adapter_config.json": b"{}",
         "train/data.arrow": b"rows"}


def test_a_committed_folder_downloads_whole_and_checked(store: Store, tmp_path: Path) -> None:
    source = make_folder(tmp_path / "src", FILES)
    assert not folders.exists(store, "jobs/j/attempt-1/checkpoint-2")
    manifest = folders.commit_folder(store, source, "jobs/j/attempt-1/checkpoint-2",
                                     meta={"step": 2, "attempt": 1})
    assert folders.exists(store, "jobs/j/attempt-1/checkpoint-2")
    assert sorted(manifest.files) == sorted(FILES)
    read = folders.read_manifest(store, "jobs/j/attempt-1/checkpoint-2")
    assert read.files == manifest.files and read.meta == {"step": 2, "attempt": 1}
    dest = tmp_path / "dest"
    folders.download_folder(store, "jobs/j/attempt-1/checkpoint-2", dest, read)
    assert {n: (dest / n).read_bytes() for n in FILES} == FILES


def test_files_without_a_manifest_are_no_folder(store: Store, tmp_path: Path) -> None:
    store.put_bytes("jobs/j/attempt-1/checkpoint-4/adapter_model.safetensors", b"half")
    assert not folders.exists(store, "jobs/j/attempt-1/checkpoint-4")
    with pytest.raises(ObjectMissing):
        folders.read_manifest(store, "jobs/j/attempt-1/checkpoint-4")


def test_a_changed_file_fails_its_check(store: Store, tmp_path: Path) -> None:
    source = make_folder(tmp_path / "src", FILES)
    manifest = folders.commit_folder(store, source, "f")
    store.put_bytes("f/adapter_config.json", b"[]")  # same size, other bytes
    with pytest.raises(folders.DamagedFolder, match="sha256"):
        folders.download_folder(store, "f", tmp_path / "dest", manifest)
    store.delete(["f/train/data.arrow"])
    with pytest.raises(folders.DamagedFolder, match="missing"):
        folders.download_folder(store, "f", tmp_path / "dest2", manifest,
                                names=["train/data.arrow"])


def test_the_first_commit_wins_and_a_retry_of_it_is_harmless(store: Store,
                                                            tmp_path: Path) -> None:
    first = make_folder(tmp_path / "a", FILES)
    folders.commit_folder(store, first, "cache/datasets/x", base="w1")
    again = folders.commit_folder(store, first, "cache/datasets/x", base="w1")
    assert sorted(again.files) == sorted(FILES)
    other = make_folder(tmp_path / "b", {**FILES, "adapter_config.json": b"{ }"})
    with pytest.raises(folders.AlreadyCommitted):
        folders.commit_folder(store, other, "cache/datasets/x", base="w2")
    # The loser's files went again; the winner's are whole.
    assert not [k for k in store.list("cache/datasets/x/") if "/w2/" in k]
    manifest = folders.read_manifest(store, "cache/datasets/x")
    folders.download_folder(store, "cache/datasets/x", tmp_path / "dest", manifest)
    assert (tmp_path / "dest" / "adapter_config.json").read_bytes() == b"{}"


def test_an_old_marker_reads_as_a_manifest_of_sizes(store: Store, tmp_path: Path) -> None:
    store.put_bytes("old/trainer_state.json", b"{}")
    store.put_bytes(f"old/{MANIFEST}", json.dumps(
        {"step": 3, "files": {"trainer_state.json": 2}, "written_at": 1.0}).encode())
    manifest = folders.read_manifest(store, "old")
    assert manifest.files["trainer_state.json"] == folders.FileEntry(2, None)
    assert manifest.meta["step"] == 3
    folders.download_folder(store, "old", tmp_path / "dest", manifest)


def test_deleting_a_folder_removes_the_manifest_and_every_object(store: Store,
                                                                 tmp_path: Path) -> None:
    folders.commit_folder(store, make_folder(tmp_path / "src", FILES), "jobs/j/attempt-2/adapter")
    store.put_bytes("jobs/j/attempt-2/adapterless", b"neighbour")
    folders.delete_folder(store, "jobs/j/attempt-2/adapter")
    assert not folders.exists(store, "jobs/j/attempt-2/adapter")
    assert store.list("jobs/") == ["jobs/j/attempt-2/adapterless"]
