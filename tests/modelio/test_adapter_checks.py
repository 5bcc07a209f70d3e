"""Adapters are served only from safetensors, with finite weights that fit the base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from modelio.adapter_checks import AdapterRejected, check_adapter

torch = pytest.importorskip("torch")


def save_adapter(base: Path, dest: Path, *, targets: tuple[str, ...] = ("q_proj", "fc1"),
                 r: int = 4) -> Path:
    """A LoRA adapter of ``base`` with non-zero weights, saved the way peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def base_config(tiny_model: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def good(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "good")


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    """A copy of the good adapter to break."""
    return Path(shutil.copytree(good, tmp_path / "adapter"))


def rewrite_weights(folder: Path, change: Any) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_a_good_adapter_passes(good: Path, base_config: Any) -> None:
    check_adapter(good, base_config)  # no exception


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "extra.pkl"])
def test_a_pickle_file_is_refused_even_next_to_safetensors(copy: Path, base_config: Any,
                                                           name: str) -> None:
    (copy / name).write_bytes(b"\x80\x04not really a pickle")

    with pytest.raises(AdapterRejected, match=rf"pickle files \({name}\)"):
        check_adapter(copy, base_config)


def test_only_bin_weights_are_refused(copy: Path, base_config: Any) -> None:
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")

    with pytest.raises(AdapterRejected, match="pickle files"):
        check_adapter(copy, base_config)


def test_no_weights_are_refused(copy: Path, base_config: Any) -> None:
    (copy / "adapter_model.safetensors").unlink()

    with pytest.raises(AdapterRejected, match="has no adapter_model.safetensors"):
        check_adapter(copy, base_config)


def test_a_missing_folder_is_refused(tmp_path: Path, base_config: Any) -> None:
    with pytest.raises(AdapterRejected, match="does not exist"):
        check_adapter(tmp_path / "nowhere", base_config)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(copy: Path, base_config: Any, value: float) -> None:
    def poison(tensors: dict[str, Any]) -> None:
        name = sorted(tensors)[0]
        tensors[name][0, 0] = value

    rewrite_weights(copy, poison)

    with pytest.raises(AdapterRejected, match="NaN or infinite"):
        check_adapter(copy, base_config)


def test_corrupt_weights_are_refused(copy: Path, base_config: Any) -> None:
    (copy / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")

    with pytest.raises(AdapterRejected, match="not a readable safetensors file"):
        check_adapter(copy, base_config)


@pytest.mark.parametrize(("config", "message"), [
    ("not json", "not readable JSON"),
    (json.dumps({"peft_type": "PREFIX_TUNING", "r": 4}), "not a LoRA adapter config"),
    (json.dumps({"peft_type": "LORA", "r": 0}), "r must be a positive integer"),
])
def test_a_bad_config_is_refused(copy: Path, base_config: Any, config: str,
                                 message: str) -> None:
    (copy / "adapter_config.json").write_text(config)

    with pytest.raises(AdapterRejected, match=message):
        check_adapter(copy, base_config)


def test_an_adapter_of_another_base_model_is_refused(tmp_path: Path, base_config: Any) -> None:
    from worker.tiny_model import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=96, intermediate_size=192)
    adapter = save_adapter(wider, tmp_path / "adapter")

    with pytest.raises(AdapterRejected, match=r"does not fit base model .*takes 128 inputs"):
        check_adapter(adapter, base_config)


def test_an_adapter_of_a_module_the_base_lacks_is_refused(copy: Path, base_config: Any) -> None:
    def rename(tensors: dict[str, Any]) -> None:
        for name in [n for n in tensors if ".q_proj." in n]:
            tensors[name.replace(".q_proj.", ".gate_proj.")] = tensors.pop(name)

    rewrite_weights(copy, rename)

    with pytest.raises(AdapterRejected, match="gate_proj"):
        check_adapter(copy, base_config)


def test_factors_of_different_ranks_are_refused(copy: Path, base_config: Any) -> None:
    def widen(tensors: dict[str, Any]) -> None:
        name = next(n for n in sorted(tensors) if ".lora_A." in n)
        tensors[name] = torch.zeros(8, tensors[name].shape[1])

    rewrite_weights(copy, widen)

    with pytest.raises(AdapterRejected, match="different ranks"):
        check_adapter(copy, base_config)


def test_the_engine_refuses_a_bad_adapter_before_loading_it(tiny_model: Path,
                                                            copy: Path) -> None:
    from engine.app import Engine
    from shared.inference import EngineCompletionRequest
    from shared.settings import Settings

    (copy / "adapter_model.bin").write_bytes(b"pickle")
    engine = Engine(Settings(engine_device="cpu"))
    body = EngineCompletionRequest.model_validate({
        "model": "m", "prompt": "hi", "max_tokens": 2,
        "target": {"model": "m", "base_model": str(tiny_model), "adapter_path": str(copy)}})

    with pytest.raises(AdapterRejected) as exc:
        engine.prepare(body)

    assert (exc.value.status, exc.value.code, exc.value.param) == (409, "adapter_rejected",
                                                                   "model")
    assert engine.host(str(tiny_model)).model is None, "nothing was loaded"


def test_a_complete_checkpoint_is_served_without_reading_its_trainer_state(
        tmp_path: Path, tiny_model: Path, base_config: Any) -> None:
    """A checkpoint folder (our completion marker, the Trainer's state files beside the
    adapter) passes; the same pickles in a plain adapter folder, or another pickle in the
    checkpoint, do not."""
    from shared.storage import COMPLETE_MARKER

    folder = save_adapter(tiny_model, tmp_path / "checkpoint-4")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / name).write_bytes(b"not loaded")
    with pytest.raises(AdapterRejected, match="pickle"):
        check_adapter(folder, base_config)

    (folder / COMPLETE_MARKER).write_text("{}")
    check_adapter(folder, base_config)

    (folder / "extra.pkl").write_bytes(b"x")
    with pytest.raises(AdapterRejected, match=r"extra\.pkl"):
        check_adapter(folder, base_config)
