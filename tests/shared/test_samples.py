"""Tests for the bundled DialogSum-style sample (``shared.samples``) and the script that writes
it (``scripts/generate_sample.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from shared.samples import SAMPLE_PATH, dialogsum_path

GENERATOR = Path(__file__).resolve().parents[2] / "scripts" / "generate_sample.py"


def load_generator() -> ModuleType:
    """``scripts/generate_sample.py``, which is a development script and not a package."""
    spec = importlib.util.spec_from_file_location("generate_sample", GENERATOR)
    assert spec is not None and spec.loader is not None, GENERATOR
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_file_has_240_valid_records() -> None:
    lines = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 240
    records = [json.loads(line) for line in lines]
    assert all(set(r) == {"id", "dialogue", "summary", "topic"} for r in records)
    assert len({r["id"] for r in records}) == 240
    assert len({r["dialogue"] for r in records}) == 240
    for r in records:
        turns = r["dialogue"].split("\n")
        assert 4 <= len(turns) <= 12, r["id"]
        for i, turn in enumerate(turns):  # speakers alternate, starting with #Person1#
            assert turn.startswith(f"#Person{i % 2 + 1}#: "), r["id"]
        assert r["summary"] and "{" not in r["summary"] + r["dialogue"], r["id"]
    assert len({r["topic"] for r in records}) >= 24


def test_sample_file_matches_generator() -> None:
    generate_sample = load_generator()

    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_sample.generate())
    assert SAMPLE_PATH.read_text(encoding="utf-8") == expected


def test_generator_writes_the_bundled_sample_by_default() -> None:
    assert load_generator().OUT_PATH == SAMPLE_PATH


def test_dialogsum_path_prefers_local_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_DIALOGSUM_DIR", str(tmp_path))
    assert dialogsum_path("train") == SAMPLE_PATH  # nothing there yet: fall back
    (tmp_path / "validation.jsonl").write_text("{}\n")
    assert dialogsum_path("validation") == tmp_path / "validation.jsonl"
    assert dialogsum_path() == SAMPLE_PATH
