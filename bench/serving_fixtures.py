"""What the serving benchmark serves: a small Phi model built from a config, random LoRA
adapters in the worker's layout (with the worker's parity probe, which vLLM replays when it
first loads one), and prompts from DialogSum.

The serving tests build their adapters with the same :func:`build_adapter`
(``tests/engine/conftest.py`` imports it): the bench never imports from ``tests/``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

MODEL: dict[str, Any] = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
                         "intermediate_size": 1536, "vocab_size": 2048,
                         "max_position_embeddings": 1024}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LORA_RANK = 8


def build_model(path: Path) -> Path:
    """The benchmark's model (:data:`MODEL`, random weights, the project's tokenizer)."""
    from worker.tiny_model import build_tiny_model

    return build_tiny_model(path, **MODEL)


def build_adapter(base: Path, dest: Path, seed: int, *, prompt_format: dict[str, Any] | None = None,
                  r: int = 8, std: float = 0.3, probe: bool = False,
                  targets: list[str] | None = None) -> Path:
    """Save a LoRA adapter of ``base`` with random, non-zero weights drawn from ``seed`` (so
    different seeds give clearly different outputs), in the worker's layout: PEFT files plus
    ``lorafleet.json`` (with the worker's parity probe if ``probe``). An existing ``dest`` is
    replaced the way the worker replaces it.

    Args:
        r: the LoRA rank (on :data:`LORA_TARGETS`).
        std: the standard deviation of the LoRA weights.
        targets: the modules adapted (default :data:`LORA_TARGETS`, the Phi model's).

    Raises:
        RuntimeError: ``probe`` and the worker made no parity probe.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or LORA_TARGETS,
                       init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, std)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    meta: dict[str, Any] = {"base_model": str(base),
                            "prompt_format": prompt_format or {"type": "dolly"},
                            "max_length": 1024}
    if probe:
        meta["parity_probe"] = parity_probe_of(model, base, meta["prompt_format"])
    (tmp / "lorafleet.json").write_text(json.dumps(meta))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def parity_probe_of(model: Any, base: Path, prompt_format: dict[str, Any]) -> dict[str, Any]:
    """The probe the worker records for a trained adapter (``worker.training.probe``).

    Raises:
        RuntimeError: the worker made no parity probe (its log says why).
    """
    from modelio.loading import load_tokenizer
    from shared.schemas import LoraSpec, TrainingSpec
    from shared.templates import PromptFormat
    from worker.training.probe import parity_probe

    spec = TrainingSpec(model=str(base), training_file="file-x", lora=LoraSpec(),
                        prompt_format=PromptFormat.model_validate(prompt_format), max_length=1024,
                        max_steps=1, n_epochs=1, batch_size=1, gradient_accumulation_steps=1,
                        learning_rate=1e-4, warmup=0, save_steps=1, logging_steps=1,
                        train_on_inputs=False, packing=False, seed=0)
    probe = parity_probe(model, load_tokenizer(str(base)), spec)
    if probe is None:
        raise RuntimeError(f"the worker made no parity probe for an adapter of {base} "
                           "(see the log)")
    return probe


def prompts(n: int) -> list[str]:
    """``n`` dialogue openings of different lengths (DialogSum)."""
    from shared.samples import dialogsum_path

    with dialogsum_path("train").open(encoding="utf-8") as f:
        lines = [json.loads(line)["dialogue"] for line in itertools.islice(f, n)]
    return [d[: 80 + 12 * (i % 8)] for i, d in enumerate(lines)]
