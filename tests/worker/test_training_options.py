"""Job options of the training path: gradient checkpointing and 4-bit (QLoRA) base models."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from modelio.loading import ModelLoadError  # noqa: E402
from tests.support.jobs import (  # noqa: E402
    create_job,
    dialogsum_records,
    jsonl_bytes,
    upload_dialogsum,
    wait_for_status,
)
from tests.worker.test_packing import spec  # noqa: E402
from worker.preprocess import prepare  # noqa: E402
from worker.training import supervised, trainer  # noqa: E402
from worker.training.model import fuse_tanh_gelu, load_model  # noqa: E402


def checkpointing_on(model: Any) -> bool:
    # transformers renamed the flag (the old name warns); read whichever this version has.
    new = "is_activation_checkpointing"
    return bool(getattr(model, new if hasattr(type(model), new) else "is_gradient_checkpointing"))


def test_gradient_checkpointing_trains_the_same_adapter(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recomputing activations in the backward pass changes memory, not the training."""
    settings_env()
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(dialogsum_records(8)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    histories = {}
    enabled = {}
    real_load = supervised.load_model
    for checkpointing in (False, True):
        job = spec(model=str(tiny_model), max_steps=2, batch_size=4,
                   gradient_checkpointing=checkpointing)
        data = prepare(job, tiny_tokenizer, path, digest)

        def spy(spec_: Any, device: str, flag: bool = checkpointing) -> Any:
            loaded = real_load(spec_, device)
            enabled[flag] = loaded[0]
            return loaded

        monkeypatch.setattr(supervised, "load_model", spy)
        result = trainer.train_adapter(job, tiny_tokenizer, data,
                                       tmp_path / f"ckpt-{checkpointing}",
                                       tmp_path / f"adapter-{checkpointing}", device="cpu")
        histories[checkpointing] = [loss for _, loss in result.loss_history]

    assert checkpointing_on(enabled[True].base_model.model)
    assert not checkpointing_on(enabled[False].base_model.model)
    assert len(histories[True]) == 2
    assert histories[True] == pytest.approx(histories[False], rel=1e-5)


def test_4bit_quantization_fails_clearly_without_a_gpu(tiny_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU") as exc:
        load_model(spec(model=str(tiny_model), quantization="4bit"), "cpu")
    assert exc.value.param == "quantization"
    assert "without quantization" in exc.value.message


def test_job_options_reach_the_training_spec() -> None:
    from shared.schemas import JobCreate

    req = JobCreate(model="org/m", training_file="file-x", gradient_checkpointing=True,
                    quantization="4bit")
    assert (req.gradient_checkpointing, req.quantization) == (True, "4bit")
    with pytest.raises(ValueError, match="quantization"):
        JobCreate(model="org/m", training_file="file-x", quantization="8bit")
    # Specs stored before these options existed still load, with the options off.
    stored = spec().model_dump()
    for name in ("gradient_checkpointing", "quantization"):
        stored.pop(name)
    old = type(spec()).model_validate(stored)
    assert (old.gradient_checkpointing, old.quantization) == (False, None)


@pytest.mark.e2e
def test_job_options_through_the_service(client: Any, tiny_model: Path) -> None:
    """Through the API and a real worker: gradient checkpointing trains; a 4-bit base model on
    a worker without a GPU fails the job, saying why."""
    file = upload_dialogsum(client, 8)
    checkpointed = create_job(client, str(tiny_model), file.id, max_steps=2, save_steps=2,
                              gradient_checkpointing=True)
    done = wait_for_status(client, checkpointed.id, "succeeded", timeout=180)
    quantized = create_job(client, str(tiny_model), file.id, max_steps=2, quantization="4bit")
    failed = wait_for_status(client, quantized.id, "failed", timeout=180)

    assert done.model_extra["gradient_checkpointing"] is True
    assert failed.model_extra["quantization"] == "4bit"
    assert (failed.error.code, failed.error.param) == ("model_load_failed", "quantization")
    assert "CUDA" in failed.error.message and "without quantization" in failed.error.message
    assert failed.attempt == 1, "a worker that can't run the option does not retry it"


def test_fused_tanh_gelu_computes_the_same_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    ids = torch.randint(4, model.config.vocab_size, (2, 24), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        swapped = fuse_tanh_gelu(model)
        after = model(input_ids=ids).logits

    assert swapped == model.config.num_hidden_layers
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
