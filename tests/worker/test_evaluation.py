"""The quality card: the prompts inference would send, batched greedy answers equal to one at a
time, the base side equal to the base model alone, scores, and a card that never fails a job."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("rouge_score")

import torch  # noqa: E402

from modelio.model_text import ModelText  # noqa: E402
from shared.records import DEFAULT_INSTRUCTION  # noqa: E402
from shared.schemas import Evaluation  # noqa: E402
from shared.templates import PromptFormat, render_prompt  # noqa: E402
from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.worker.test_packing import spec as make_spec  # noqa: E402
from worker import evaluation  # noqa: E402
from worker.training import StopTraining  # noqa: E402

DOLLY = PromptFormat(type="dolly", instruction=DEFAULT_INSTRUCTION)


def spec(tiny_model: Path, **overrides: Any) -> Any:
    return make_spec(model=str(tiny_model), prompt_format=DOLLY, **overrides)


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (not zero) weights: it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "fc1"]))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text(tiny_model: Path) -> ModelText:
    return ModelText(str(tiny_model))


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl_bytes(records))
    return path


# --------------------------------------------------------------------------- scores
def test_scores_are_one_for_equal_answers_and_zero_for_disjoint_ones() -> None:
    same = evaluation.score(["#Person1# buys  a ticket."], ["#Person1# buys a ticket."])
    other = evaluation.score(["zebra"], ["#Person1# buys a ticket."])

    assert same.model_dump() == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "exact_match": 1.0}
    assert other.model_dump() == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0,
                                  "exact_match": 0.0}


def test_scores_are_stemmed_means() -> None:
    scores = evaluation.score(["the cats sat", "nothing"], ["the cat sat", "the cat sat"])

    assert scores.rouge1 == pytest.approx(0.5)  # stemmed: "cats" counts as "cat"
    assert scores.exact_match == 0.0


def test_answers_end_at_the_format_s_end_marker() -> None:
    assert evaluation.cut_at_stops(" A summary.\n\n### End\nmore", ["### End"]) == "A summary."
    assert evaluation.cut_at_stops(" no marker ", ["### End"]) == "no marker"


# --------------------------------------------------------------------------- examples
def test_examples_are_the_first_records_prompted_as_inference_prompts_them(
    tiny_model: Path, text: ModelText, tmp_path: Path
) -> None:
    records = dialogsum_records(5)
    path = write_records(tmp_path / "valid.jsonl", records)

    examples = evaluation.load_examples(path, spec(tiny_model), text, limit=3, max_new_tokens=16)

    assert [e.reference for e in examples] == [r["summary"].strip() for r in records[:3]]
    for example, record in zip(examples, records, strict=False):
        assert example.prompt_ids == text.encode(render_prompt(DOLLY, record["dialogue"]))


def test_records_whose_prompt_reaches_max_length_are_left_out(
    tiny_model: Path, text: ModelText, tmp_path: Path
) -> None:
    records = dialogsum_records(4)
    records[1] = {**records[1], "dialogue": "#Person1#: hello there. " * 400}
    path = write_records(tmp_path / "valid.jsonl", records)

    examples = evaluation.load_examples(path, spec(tiny_model, max_length=512), text, limit=10,
                                        max_new_tokens=16)

    assert [e.reference for e in examples] == [records[i]["summary"].strip() for i in (0, 2, 3)]


# --------------------------------------------------------------------------- generation
def test_batched_answers_equal_answers_one_at_a_time(
    tiny_model: Path, text: ModelText, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    path = write_records(tmp_path / "valid.jsonl", dialogsum_records(5))
    examples = evaluation.load_examples(path, spec(tiny_model), text, limit=5, max_new_tokens=12)
    assert len({len(e.prompt_ids) for e in examples}) > 1  # the batch needs padding
    kwargs: dict[str, Any] = {"max_new_tokens": 12, "stop_ids": sorted(text.eos_ids),
                              "stops": ["### End"]}

    batched = evaluation.generate_answers(model, text.tokenizer, examples, **kwargs)
    monkeypatch.setattr(evaluation, "BATCH_SIZE", 1)
    alone = evaluation.generate_answers(model, text.tokenizer, examples, **kwargs)

    assert batched == alone
    assert any(batched)


def test_base_answers_are_the_base_model_s_and_the_adapter_changes_them(
    tiny_model: Path, text: ModelText, adapter: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    job = spec(tiny_model)
    path = write_records(tmp_path / "valid.jsonl", dialogsum_records(3))
    examples = evaluation.load_examples(path, job, text, limit=3, max_new_tokens=12)

    answers = evaluation.answer_both(job, adapter, examples, text, device="cpu",
                                     max_new_tokens=12)

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    alone = evaluation.generate_answers(base, text.tokenizer, examples, max_new_tokens=12,
                                        stop_ids=sorted(text.eos_ids), stops=["### End"])
    assert answers.base == alone
    assert answers.fine_tuned != answers.base
    assert answers.references == [e.reference for e in examples]


# --------------------------------------------------------------------------- on the job
class Writer:
    """Records what :func:`record_evaluation` writes to the job."""

    def __init__(self, stop: str | None = None, fail: Exception | None = None):
        self.writes: list[dict[str, Any]] = []
        self.stop = stop
        self.fail = fail

    def write(self, *, best_effort: bool = False, **values: Any) -> None:
        if self.fail is not None and "evaluation" in values:
            raise self.fail
        self.writes.append(values)

    def should_stop(self) -> str | None:
        return self.stop


def record(writer: Writer, tiny_model: Path, adapter: Path, valid: Path,
           **overrides: Any) -> Evaluation | None:
    options: dict[str, Any] = {"device": "cpu", "max_examples": 4, "max_new_tokens": 8,
                               **overrides}
    return evaluation.record_evaluation(writer, spec(tiny_model), adapter, valid, **options)


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return write_records(tmp_path / "valid.jsonl", dialogsum_records(6, split="validation"))


def test_the_card_goes_on_the_job_with_an_event(
    tiny_model: Path, adapter: Path, valid: Path, settings_env: Callable[..., Any]
) -> None:
    writer = Writer()

    card = record(writer, tiny_model, adapter, valid)

    assert card is not None and card.examples == 4 and card.max_new_tokens == 8
    [start, write] = writer.writes
    assert start["event"] == ("Evaluating the base model and the fine-tuned model on the "
                              "validation records (at most 4)")
    assert Evaluation.model_validate(write["evaluation"]) == card
    assert write["event"].startswith("Evaluation on 4 validation example(s): ROUGE-L base ")
    assert write["event_data"]["fine_tuned"] == card.fine_tuned.model_dump()
    json.dumps(write)  # stored as JSON


def test_a_failed_evaluation_is_a_warning_not_a_failed_job(
    tiny_model: Path, valid: Path, tmp_path: Path
) -> None:
    writer = Writer()

    card = record(writer, tiny_model, tmp_path / "no-adapter", valid)

    assert card is None
    [_, write] = writer.writes
    assert write["level"] == "warn"
    assert write["event"].startswith("Evaluation failed, the job has no evaluation: ")
    assert "evaluation" not in write


def test_a_stop_request_skips_the_evaluation(tiny_model: Path, adapter: Path,
                                             valid: Path) -> None:
    writer = Writer(stop="cancel")

    assert record(writer, tiny_model, adapter, valid) is None
    assert writer.writes[1:] == [{"event": "Evaluation skipped: the job was cancelled",
                                  "level": "warn"}]


def test_a_lost_lease_while_storing_the_card_stops_the_attempt(
    tiny_model: Path, adapter: Path, valid: Path
) -> None:
    writer = Writer(fail=StopTraining("lease lost"))

    with pytest.raises(StopTraining):
        record(writer, tiny_model, adapter, valid)


def test_no_record_short_enough_is_said(tiny_model: Path, adapter: Path, valid: Path) -> None:
    writer = Writer()

    card = evaluation.record_evaluation(writer, spec(tiny_model, max_length=16), adapter, valid,
                                        device="cpu", max_examples=4, max_new_tokens=8)

    assert card is None
    assert writer.writes[-1]["event"].startswith("Evaluation skipped: no validation record")


def test_zero_examples_turns_the_evaluation_off(tiny_model: Path, adapter: Path,
                                                valid: Path) -> None:
    writer = Writer()

    assert record(writer, tiny_model, adapter, valid, max_examples=0) is None
    assert writer.writes == []
