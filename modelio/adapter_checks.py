"""What an adapter folder must pass before it is loaded for serving.

Adapters are read from safetensors only: a pickle (``.bin``, ``.pt``, …) can run code when it
is loaded, so a folder that holds one is refused, even next to safetensors weights. The
weights must be finite, and every tensor must fit the base model: LoRA factors of a module
the base model has, with its input and output sizes, so that an adapter trained on another
base model is refused with a message instead of failing (or silently misbehaving) in a batch.

Checkpoints are trusted differently: they are written by our own workers, and transformers 5
reads the optimizer, scheduler, scaler and RNG files of a resumed checkpoint with
``torch.load(..., weights_only=True)`` (``Trainer._load_optimizer_and_scheduler``,
``Trainer._load_rng_state``), which refuses pickled code.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from shared.errors import LorafleetError
from shared.storage import COMPLETE_MARKER

SAFE_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What transformers' Trainer writes into a checkpoint folder besides the adapter.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin")


def _trainer_state(name: str) -> bool:
    return name in TRAINER_STATE_FILES or (name.startswith("rng_state") and
                                           name.endswith(".pth"))


# peft stores the wrapped model's parameters under this prefix.
PEFT_PREFIX = "base_model.model."
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
_SKELETONS: OrderedDict[str, Any] = OrderedDict()
_SKELETONS_LOCK = threading.Lock()
_SKELETON_CACHE = 4


class AdapterRejected(LorafleetError):
    """An adapter folder that is not served: unsafe files, bad weights, or another base
    model's shapes. The message says which file or tensor."""

    status = 409
    code = "adapter_rejected"

    def __init__(self, message: str):
        super().__init__(message, param="model")


def check_adapter(path: str | Path, base_model_config: Any) -> None:
    """Refuse an adapter folder unless it is safe and fits the base model.

    Args:
        path: the adapter folder (peft layout).
        base_model_config: the base model's ``transformers`` config (``AutoConfig``).

    Raises:
        AdapterRejected: no folder; a pickle file in it; no ``adapter_model.safetensors``; an
            ``adapter_config.json`` that is not a LoRA config; unreadable weights; a
            non-finite weight; a tensor for a module the base model does not have, or of
            another size.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterRejected(f"adapter folder {folder} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if (folder / COMPLETE_MARKER).is_file():
        # A complete checkpoint served as a model: the Trainer's own state files lie beside
        # the adapter; serving never reads them (only the safetensors weights are loaded).
        pickles = [name for name in pickles if not _trainer_state(name)]
    if pickles:
        raise AdapterRejected(
            f"adapter folder {folder} holds pickle files ({', '.join(pickles)}); only "
            f"safetensors weights ({SAFE_WEIGHTS}) are loaded")
    weights = folder / SAFE_WEIGHTS
    if not weights.is_file():
        raise AdapterRejected(f"adapter folder {folder} has no {SAFE_WEIGHTS}")
    _check_config(folder / ADAPTER_CONFIG)
    tensors = _load(weights)
    _check_finite(tensors, weights)
    _check_fits(tensors, base_model_config, folder)


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterRejected(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise AdapterRejected(f"{path} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterRejected(f"{path} is not a LoRA adapter config (peft_type must be LORA)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterRejected(f"{path}: r must be a positive integer, got {r!r}")


def _load(weights: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterRejected(f"{weights} is not a readable safetensors file: {e}") from e
    if not tensors:
        raise AdapterRejected(f"{weights} holds no tensors")
    return tensors


def _check_finite(tensors: dict[str, Any], weights: Path) -> None:
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterRejected(f"{weights}: tensor {name} has NaN or infinite values")


def _skeleton(config: Any) -> Any:
    """The base model built on the meta device (shapes, no memory), cached per config."""
    import torch
    from transformers import AutoModelForCausalLM

    key = config.to_json_string()
    with _SKELETONS_LOCK:
        if key in _SKELETONS:
            _SKELETONS.move_to_end(key)
            return _SKELETONS[key]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - an architecture transformers does not know
        raise AdapterRejected(f"cannot check adapters against this base model: {e}") from e
    with _SKELETONS_LOCK:
        _SKELETONS[key] = model
        while len(_SKELETONS) > _SKELETON_CACHE:
            _SKELETONS.popitem(last=False)
    return model


def _in_out(module: Any) -> tuple[int, int] | None:
    """(input size, output size) of a layer LoRA can adapt; ``None`` for other modules."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings), int(module.embedding_dim)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2 style: (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _check_fits(tensors: dict[str, Any], config: Any, folder: Path) -> None:
    model = _skeleton(config)
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    ranks: dict[str, dict[str, int]] = {}
    base = getattr(config, "_name_or_path", "") or type(model).__name__
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        shape = tuple(tensor.shape)
        marker = next((m for m in _LORA_MARKERS if m in name), None)
        if marker is None:  # a fully trained module (modules_to_save): same shape as the base
            if params.get(name) != shape:
                raise AdapterRejected(
                    f"adapter {folder} does not fit base model {base}: tensor {key} {shape} "
                    f"has no parameter of that name and shape in the base model")
            continue
        module_name, _, _ = name.partition(marker)
        module = modules.get(module_name)
        sizes = _in_out(module) if module is not None else None
        if sizes is None or len(shape) != 2:
            raise AdapterRejected(
                f"adapter {folder} does not fit base model {base}: {key} adapts "
                f"'{module_name}', which the base model has no adaptable layer for")
        fan_in, fan_out = sizes
        factor = "A" if "_A" in marker else "B"
        # A maps the input down to rank r, B maps rank r up to the output.
        rank, size, expected = ((shape[0], shape[1], fan_in) if factor == "A"
                                else (shape[1], shape[0], fan_out))
        if size != expected:
            raise AdapterRejected(
                f"adapter {folder} does not fit base model {base}: {key} has shape {shape}, "
                f"but '{module_name}' takes {fan_in} inputs and gives {fan_out} outputs")
        ranks.setdefault(module_name, {})[factor] = rank
    for module_name, pair in ranks.items():
        if len(set(pair.values())) > 1:
            raise AdapterRejected(f"adapter {folder}: the LoRA factors of '{module_name}' have "
                                  f"different ranks {pair}")
