"""The parity probe stored with a trained adapter is exactly what peft generates with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from shared.templates import PromptFormat, render_prompt  # noqa: E402
from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.worker.test_packing import spec  # noqa: E402
from worker.preprocess import chat_renderer, prepare  # noqa: E402
from worker.training import trainer  # noqa: E402
from worker.training.probe import PROBE_INPUT, PROBE_MAX_NEW_TOKENS  # noqa: E402

FORMATS = {
    "dolly": PromptFormat(type="dolly", instruction="Summarize the below conversation."),
    "chat": PromptFormat(type="chat", instruction="Summarize the below conversation."),
}


@torch.inference_mode()
def greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stops)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_adapter_carries_the_greedy_tokens_peft_generates_with_it(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path,
    fmt: str,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings_env()
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(dialogsum_records(8)))
    # A high rate, so that the adapter visibly changes what the model writes.
    job = spec(model=str(tiny_model), max_steps=4, save_steps=2, batch_size=4,
               learning_rate=1e-2, prompt_format=FORMATS[fmt])
    data = prepare(job, tiny_tokenizer, path, hashlib.sha256(path.read_bytes()).hexdigest())
    result = trainer.train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt",
                                   tmp_path / "adapter", device="cpu")

    assert result.adapter_dir is not None
    probe = json.loads((result.adapter_dir / "lorafleet.json").read_text())["parity_probe"]
    # The prompt inference sends for the probe's input: wrapped in the format, no specials.
    renderer = chat_renderer(tiny_tokenizer) if fmt == "chat" else None
    prompt = render_prompt(FORMATS[fmt], PROBE_INPUT, renderer)
    assert probe["prompt_ids"] == tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert probe["max_new_tokens"] == PROBE_MAX_NEW_TOKENS
    assert 0 < len(probe["token_ids"]) <= PROBE_MAX_NEW_TOKENS
    assert tiny_tokenizer.eos_token_id in probe["stop_token_ids"]
    if fmt == "chat":
        assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in probe["stop_token_ids"]
    assert probe["text"] == tiny_tokenizer.decode(probe["token_ids"], skip_special_tokens=True)
    assert not list((tmp_path / "ckpt").rglob("lorafleet.json")), "the final adapter's only"

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    args = (probe["prompt_ids"], probe["max_new_tokens"], probe["stop_token_ids"])
    without_adapter = greedy(base, *args)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    assert greedy(model, *args) == probe["token_ids"]
    assert without_adapter != probe["token_ids"], "the probe must show the adapter's effect"

