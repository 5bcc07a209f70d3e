"""The model to train: a base model on a device, in a dtype, maybe 4-bit, with a fresh LoRA
adapter on the projections of its architecture, or the adapter of the fine-tuned model or
checkpoint that the job continues training from."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelio.loading import ModelLoadError
from shared import storage
from shared.schemas import TrainingSpec
from shared.storage import ObjectMissing
from shared.storage.folders import DamagedFolder
from worker.attention import use_packed_attention
from worker.devices import pin
from worker.last_layer import run_last_layer_on_loss_positions

log = logging.getLogger(__name__)

# What a continued job reads of the adapter it starts from (a checkpoint's folder also holds
# the Trainer's state, which it does not need).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

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
    """The device to train on: ``setting`` itself, ``cuda:0`` for a ``cuda:N`` this process
    is pinned to (see :mod:`worker.devices`), or for ``"auto"`` CUDA where there is one.

    Raises:
        DeviceError: ``cuda:N`` names a GPU this node lacks, or comes after CUDA started.
    """
    if setting != "auto":
        return pin(setting)
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


class FusedTanhGELU(torch.nn.GELU):
    """PyTorch's fused tanh-GELU standing in for transformers' ``NewGELUActivation``."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' ``NewGELUActivation`` (Phi, GPT-2: the tanh approximation of GELU
    written as six elementwise ops) for PyTorch's fused kernel of the same formula: one pass
    instead of six, forward and backward, equal to float rounding. Returns how many."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, FusedTanhGELU())
                swapped += 1
    return swapped


def unfuse_tanh_gelu(model: torch.nn.Module) -> None:
    """Undo :func:`fuse_tanh_gelu`: the model computes again exactly what it computes when
    loaded with ``from_pretrained``, not only to float rounding."""
    from transformers.activations import NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedTanhGELU):
                setattr(parent, name, NewGELUActivation())


def load_base(spec: TrainingSpec, device: str) -> Any:
    """The job's base model on ``device``, in its training dtype (4-bit for QLoRA), without an
    adapter.

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
    return base


def load_model(spec: TrainingSpec, device: str) -> tuple[PeftModel, int, int]:
    """Base model + fresh LoRA adapter (or, for a continued job, the adapter it continues
    from); returns ``(model, trainable, total)`` parameters.

    Raises:
        ModelLoadError: the model does not load, ``quantization`` can't run here, or the
            adapter to continue from is gone or does not fit the base model.
    """
    base = load_base(spec, device)
    if spec.initial_adapter is not None:
        model = continued_adapter(base, spec)
    else:
        model = _fresh_adapter(base, spec)
    trainable, total = model.get_nb_trainable_parameters()
    # The seed recipe's report, kept for the worker log.
    log.info("trainable params: %d || all params: %d || trainable%%: %.4f",
             trainable, total, 100 * trainable / total)
    return model, trainable, total


def lora_config(spec: TrainingSpec, base: Any) -> LoraConfig:
    """The job's LoRA adapter: its shape, on ``lora.target_modules`` or the projections of the
    base model's architecture."""
    targets: list[str] | str = (spec.lora.target_modules
                                or TARGET_MODULES.get(base.config.model_type) or "all-linear")
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # annotated int; any number scales
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _fresh_adapter(base: Any, spec: TrainingSpec) -> PeftModel:
    config = lora_config(spec, base)
    try:
        return get_peft_model(base, config)
    except ValueError as e:
        raise ModelLoadError(f"LoRA: {e}", param="lora.target_modules") from e


def continued_adapter(base: Any, spec: TrainingSpec) -> PeftModel:
    """The adapter of ``spec.initial_adapter`` on ``base``, trainable, with the spec's dropout
    (its shape was checked against the request when the job was created).

    Raises:
        ModelLoadError: its files are gone (the API refuses to delete a model that an
            unfinished job continues from, but retention removes the older checkpoints of a
            job still training), or its weights do not fit ``base``.
    """
    assert spec.initial_adapter is not None
    source = spec.initial_model or spec.initial_adapter
    try:
        folder = storage.get_cache().folder(storage.get_store(), spec.initial_adapter,
                                            names=ADAPTER_FILES, legacy=True)
        config = LoraConfig.from_pretrained(str(folder))
        saved = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError, ObjectMissing, DamagedFolder) as e:
        raise ModelLoadError(f"the adapter this job continues from ({source}) is gone: {e}",
                             param="model") from e
    config.lora_dropout = spec.lora.dropout
    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=True, config=config)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"could not load {source} to continue from: {e}",
                             param="model") from e
    # peft only warns about weights it could not place; a continued job must start from all.
    loaded = get_peft_model_state_dict(model)
    if set(loaded) != set(saved):
        raise ModelLoadError(
            f"the adapter of {source} does not fit base model {spec.model}: "
            f"{len(set(saved) ^ set(loaded))} weights differ in name", param="model")
    log.info("continuing from %s (%s)", source, folder)
    return model
