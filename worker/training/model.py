"""The model to train: a base model on a device, in a dtype, maybe 4-bit, with a fresh LoRA
adapter on the projections of its architecture."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from shared.schemas import TrainingSpec
from worker.attention import use_packed_attention
from worker.last_layer import run_last_layer_on_loss_positions
from worker.loading import ModelLoadError

log = logging.getLogger(__name__)

# Attention and MLP projections per architecture; anything else gets peft's "all-linear".
TARGET_MODULES: dict[str, list[str]] = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def pick_device(setting: str) -> str:
    """The device to train on: ``setting`` itself, or for ``"auto"`` CUDA where there is one."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _quantization_config(spec: TrainingSpec, device: str) -> Any:
    """``BitsAndBytesConfig`` for ``quantization: "4bit"`` (QLoRA), or None.

    Raises:
        ModelLoadError: this worker can't run a 4-bit base model (no CUDA, no bitsandbytes).
    """
    if spec.quantization is None:
        return None
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ModelLoadError(
            f"quantization '{spec.quantization}' needs a CUDA GPU and this worker trains on "
            f"'{device}'; submit the job without quantization or run a GPU worker",
            param="quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization '{spec.quantization}' needs the bitsandbytes package, which this "
            "worker lacks (pip install 'lorafleet[gpu]'); or submit without quantization",
            param="quantization")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported()
        else torch.float16,
    )


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' ``NewGELUActivation`` (Phi, GPT-2: the tanh approximation of GELU
    written as six elementwise ops) for PyTorch's fused kernel of the same formula: one pass
    instead of six, forward and backward, equal to float rounding. Returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def load_model(spec: TrainingSpec, device: str) -> tuple[PeftModel, int, int]:
    """Base model + fresh LoRA adapter; returns ``(model, trainable, total)`` parameters.

    Raises:
        ModelLoadError: the model does not load, or ``quantization`` can't run here.
    """
    dtype = torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    quantization = _quantization_config(spec, device)
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra = {"quantization_config": quantization,
                 "device_map": {"": torch.cuda.current_device()}}
    try:
        base = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype,
                                                    trust_remote_code=False, **extra)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load model '{spec.model}': {e}", param="model") from e
    # A KV cache is for generation; in training it only keeps copies of every layer's keys and
    # values, and (transformers 5) its presence turns off the per-sample mask of packed rows.
    base.config.use_cache = False
    fuse_tanh_gelu(base)
    if spec.packing and use_packed_attention(base) and not spec.train_on_inputs:
        run_last_layer_on_loss_positions(base)
    if quantization is not None:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] | str = (spec.lora.target_modules
                                or TARGET_MODULES.get(base.config.model_type) or "all-linear")
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # annotated int; any number scales
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as e:
        raise ModelLoadError(f"LoRA: {e}", param="lora.target_modules") from e
    trainable, total = model.get_nb_trainable_parameters()
    # The seed recipe's report, kept for the worker log.
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f",
             trainable, total, 100 * trainable / total)
    return model, trainable, total
