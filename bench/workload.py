"""What both sides of the training benchmark train on: a small Phi model, DialogSum examples,
and the validation loss they are judged by.

The examples are chosen once and written to a JSONL file that both sides read, so they train on
exactly the same records in the same order (the Trainer's sampler is seeded the same way).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.records import DEFAULT_INSTRUCTION, to_example
from shared.samples import dialogsum_path
from shared.templates import PromptFormat, Rendered, render

# The recipe's format: Dolly-style blocks around a DialogSum dialogue.
FORMAT = PromptFormat(type="dolly", instruction=DEFAULT_INSTRUCTION)


@dataclass(frozen=True)
class ModelSize:
    """Arguments of ``worker.tiny_model.build_tiny_model`` (a random-init Phi)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int

    def describe(self, parameters: int) -> str:
        return (f"Phi, {parameters / 1e6:.1f} M params: hidden {self.hidden_size}, "
                f"{self.num_hidden_layers} layers, {self.num_attention_heads} heads, "
                f"MLP {self.intermediate_size}, vocab {self.vocab_size} (BPE trained on "
                "DialogSum), random init")


def read_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def render_record(record: dict[str, Any]) -> Rendered:
    return render(FORMAT, to_example(record, instruction=FORMAT.instruction))


def build_model(dest: Path, size: ModelSize, corpus_records: int) -> tuple[Path, int]:
    """Build (or reuse) the benchmark model; returns its folder and parameter count.

    The tokenizer is trained on the first ``corpus_records`` DialogSum training records, so
    tokens per word are what a real tokenizer gives on this text.
    """
    from worker.tiny_model import PROMPT_STRINGS, build_tiny_model

    stamp = dest / "bench-size.json"
    wanted = {**asdict(size), "corpus_records": corpus_records,
              "source": str(dialogsum_path("train"))}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        texts: list[str] = []
        for r in read_records(dialogsum_path("train"), corpus_records):
            texts += [r["dialogue"], r["summary"]]
        texts += PROMPT_STRINGS * 64
        build_tiny_model(dest, corpus=texts, max_position_embeddings=1024, **asdict(size))
        stamp.write_text(json.dumps(wanted))
    from safetensors import safe_open

    params = 0
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            params += math.prod(f.get_slice(key).get_shape())
    return dest, params


def fits(tokenizer: Any, rendered: Rendered, max_length: int) -> bool:
    """Kept by both sides: the recipe's full-text tokenization and lorafleet's prompt +
    response + eos are both shorter than ``max_length``."""
    full = len(tokenizer(rendered.text, add_special_tokens=False)["input_ids"])
    split = (len(tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"])
             + len(tokenizer(rendered.response, add_special_tokens=False)["input_ids"]) + 1)
    return max(full, split) < max_length


def select_examples(tokenizer: Any, split: str, count: int, max_length: int,
                    dest: Path, *, allow_fewer: bool = False) -> tuple[Path, int]:
    """Write the first ``count`` records of a DialogSum split that fit ``max_length`` to
    ``dest``; returns the path and how many records were passed over as too long.

    With ``allow_fewer``, a split with fewer such records gives them all (training then
    cycles through them), else that is an error."""
    kept: list[dict[str, Any]] = []
    skipped = 0
    for record in read_records(dialogsum_path(split)):
        if fits(tokenizer, render_record(record), max_length):
            kept.append(record)
            if len(kept) == count:
                break
        else:
            skipped += 1
    if len(kept) < count and not (allow_fewer and kept):
        raise SystemExit(f"only {len(kept)} {split} records fit max_length={max_length}, "
                         f"{count} needed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return dest, skipped


@dataclass(frozen=True)
class Losses:
    response: float  # mean cross-entropy per response token
    all_tokens: float  # mean cross-entropy per token of the whole text (first token excluded)
    response_tokens: int
    all_token_count: int


def validation_loss(model_dir: Path, adapter_dir: Path | None, tokenizer: Any,
                    records: list[dict[str, Any]]) -> Losses:
    """Token-weighted validation losses of a trained adapter, one example at a time.

    Every adapter sees the same inputs: prompt and response tokenized apart (the boundary that
    inference uses), no eos. Response loss: over the response's tokens (the summary and the
    format's end marker), each predicted from everything before it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter_dir is not None:  # None: the base model, i.e. any adapter before training
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    resp_sum = all_sum = 0.0
    resp_n = all_n = 0
    with torch.inference_mode():
        for record in records:
            rendered = render_record(record)
            prompt = tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]
            response = tokenizer(rendered.response, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            resp = nll[len(prompt) - 1:]
            resp_sum += float(resp.sum())
            resp_n += resp.numel()
            all_sum += float(nll.sum())
            all_n += nll.numel()
    return Losses(resp_sum / resp_n, all_sum / all_n, resp_n, all_n)
