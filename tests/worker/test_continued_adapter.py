"""A continued job's model: the adapter it continues from, loaded trainable with every weight
as saved, or a failure that names ``model``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from modelio.loading import ModelLoadError  # noqa: E402
from shared import storage  # noqa: E402
from shared.schemas import LoraSpec  # noqa: E402
from shared.storage import folders  # noqa: E402
from tests.worker.test_packing import spec  # noqa: E402
from worker.training.model import load_model  # noqa: E402

LORA = LoraSpec(r=4, alpha=8, dropout=0.1)


@pytest.fixture
def trained(settings_env: Callable[..., Any], tiny_model: Path,
            tmp_path: Path) -> tuple[dict[str, Any], str]:
    """An adapter whose weights are all non-zero, committed in storage; its weights and its
    folder's key."""
    from peft import get_peft_model_state_dict

    settings_env()
    model, _, _ = load_model(spec(model=str(tiny_model), lora=LORA), "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    model.save_pretrained(str(tmp_path / "adapter"))
    key = storage.adapter_key("ftjob-source", 1)
    folders.commit_folder(storage.get_store(), tmp_path / "adapter", key)
    weights = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    return weights, key


def test_a_continued_job_starts_from_every_saved_weight(tiny_model: Path,
                                                       trained: tuple[dict[str, Any], str]
                                                       ) -> None:
    from peft import get_peft_model_state_dict

    weights, folder = trained
    model, trainable, _ = load_model(spec(model=str(tiny_model), lora=LORA.model_copy(
        update={"dropout": 0.0}), initial_model="ft:tiny::ftjob-source",
        initial_adapter=folder), "cpu")

    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert trainable == sum(w.numel() for w in weights.values())
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert model.peft_config["default"].lora_dropout == 0.0  # the job's, not the source's


def test_an_adapter_that_is_gone_or_does_not_fit_fails_naming_model(
        tiny_model: Path, trained: tuple[dict[str, Any], str]) -> None:
    _, folder = trained
    gone = spec(model=str(tiny_model), lora=LORA, initial_model="ft:tiny::ftjob-gone",
                initial_adapter="jobs/ftjob-gone/adapter")
    with pytest.raises(ModelLoadError) as missing:
        load_model(gone, "cpu")
    assert missing.value.param == "model" and "ft:tiny::ftjob-gone" in str(missing.value)

    local = storage.get_store().local_path(folder)
    assert local is not None
    config = local / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "target_modules": ["no_such_proj"]}))
    with pytest.raises(ModelLoadError) as misfit:
        load_model(spec(model=str(tiny_model), lora=LORA, initial_model="ft:tiny::ftjob-source",
                        initial_adapter=folder), "cpu")
    assert misfit.value.param == "model"
