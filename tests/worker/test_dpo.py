"""DPO jobs on the worker: preference pairs tokenized as supervised rows, TRL's DPOTrainer set
up from the job's spec (not from its GPU defaults), the reference model each case uses, and the
metrics, checkpoints and adapter a DPO run leaves."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from shared import storage  # noqa: E402
from shared.errors import InvalidDataset  # noqa: E402
from shared.schemas import DpoSpec, LoraSpec, TrainingSpec  # noqa: E402
from shared.storage import folders  # noqa: E402
from shared.templates import PromptFormat, render  # noqa: E402
from tests.support import dialogsum_records, jsonl_bytes  # noqa: E402
from tests.support.preference import OPENAI_EXAMPLE, preference_pairs  # noqa: E402
from tests.worker.test_packing import spec as supervised_spec  # noqa: E402
from tests.worker.test_training_hooks import Recorder, of  # noqa: E402
from worker.preprocess import prepare  # noqa: E402
from worker.training import (  # noqa: E402
    CheckpointInfo,
    FullValidationMetrics,
    TrainMetrics,
    ValidationMetrics,
    method_for,
    train_adapter,
)
from worker.training.adapter_io import ADAPTER_META  # noqa: E402
from worker.training.callbacks import JobCallback  # noqa: E402
from worker.training.dpo import METRICS, dpo_config  # noqa: E402
from worker.training.hooks import Hooks  # noqa: E402
from worker.training.preference_data import render_pairs, tokenize_pairs  # noqa: E402
from worker.training.results import results_columns, results_csv  # noqa: E402


def dpo_spec(model: Path, **overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "model": str(model), "method": "dpo", "dpo": DpoSpec(), "packing": False,
        "prompt_format": PromptFormat(type="dolly"), "lora": LoraSpec(r=4, alpha=8),
        "learning_rate": 1e-3, "batch_size": 4, "seed": 3, "max_length": 1024,
    }
    return supervised_spec(**{**values, **overrides})


def write(path: Path, records: list[Any]) -> tuple[Path, str]:
    path.write_bytes(jsonl_bytes(records))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pairs(tmp_path: Path, settings_env: Callable[..., Any]) -> dict[str, tuple[Path, str]]:
    settings_env()
    return {"train": write(tmp_path / "train.jsonl", preference_pairs(12)),
            "valid": write(tmp_path / "valid.jsonl", preference_pairs(4, offset=12))}


def sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Each row's summed log-probability of its completion tokens, computed plainly from the
    logits (no fused head, no adapter switching)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    target = batch["input_ids"][:, 1:]
    per_token = logps.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)


# --------------------------------------------------------------------------- the data
def test_pairs_are_tokenized_as_supervised_rows(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path, _ = write(tmp_path / "pairs.jsonl", [OPENAI_EXAMPLE, *preference_pairs(3)])
    job = dpo_spec(Path("tiny"))
    rendered = render_pairs(path, job, tiny_tokenizer, "training_file")
    eos = tiny_tokenizer.eos_token_id

    columns, dropped = tokenize_pairs(rendered, tiny_tokenizer, 10_000)

    chosen, rejected = rendered[0]
    assert chosen.prompt == rejected.prompt
    assert chosen.prompt == render(job.prompt_format, _example(OPENAI_EXAMPLE)).prompt
    assert (dropped, len(columns["prompt_ids"])) == (0, 4)
    assert columns["prompt_ids"][0] == tiny_tokenizer(chosen.prompt,
                                                      add_special_tokens=False)["input_ids"]
    assert columns["chosen_ids"][0] == tiny_tokenizer(chosen.response,
                                                      add_special_tokens=False)["input_ids"] + [eos]
    assert columns["rejected_ids"][0][-1] == eos
    assert columns["chosen_ids"][0] != columns["rejected_ids"][0]


def _example(record: dict[str, Any]) -> Any:
    from shared.records import validate_record

    return validate_record(record, prompt_format=PromptFormat())


def test_pairs_reaching_max_length_are_dropped_and_counted(tiny_tokenizer: Any,
                                                           tmp_path: Path) -> None:
    path, _ = write(tmp_path / "pairs.jsonl", preference_pairs(6))
    rendered = render_pairs(path, dpo_spec(Path("tiny")), tiny_tokenizer, "training_file")
    all_kept, _ = tokenize_pairs(rendered, tiny_tokenizer, 10_000)
    longest = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(all_kept["prompt_ids"], all_kept["chosen_ids"], all_kept["rejected_ids"],
                   strict=True)]

    kept, dropped = tokenize_pairs(rendered, tiny_tokenizer, sorted(longest)[3])

    assert dropped == 3  # the longest pair of each kept one's answers fits below the limit
    assert all(len(p) + max(len(c), len(r)) < sorted(longest)[3] for p, c, r in
               zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"], strict=True))


def test_a_record_that_is_no_pair_is_named_by_line(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path, _ = write(tmp_path / "mixed.jsonl", [OPENAI_EXAMPLE, dialogsum_records(1)[0]])

    with pytest.raises(InvalidDataset, match=r"^training_file line 2: a DPO job trains on "
                                             "preference pairs and this record is dialogsum"):
        render_pairs(path, dpo_spec(Path("tiny")), tiny_tokenizer, "training_file")


# --------------------------------------------------------------------------- the config
def test_the_spec_is_mapped_onto_dpo_config_not_its_gpu_defaults(tmp_path: Path) -> None:
    job = dpo_spec(Path("tiny"), learning_rate=3e-4, max_length=777,
                   dpo=DpoSpec(beta=0.3, loss_type="ipo", rpo_alpha=0.5))

    config = dpo_config(job, tmp_path, "cpu", has_eval=True)

    assert (config.bf16, config.fp16) == (False, False)
    assert config.gradient_checkpointing is False
    assert (config.learning_rate, config.max_length, config.logging_steps) == (3e-4, 777, 1)
    assert (config.beta, config.loss_type, config.loss_weights) == (0.3, ["ipo", "sft"],
                                                                    [1.0, 0.5])
    assert config.disable_dropout and not config.precompute_ref_log_probs
    assert (config.per_device_train_batch_size, config.seed) == (4, 3)
    assert config.eval_steps == config.save_steps == job.save_steps
    plain = dpo_config(dpo_spec(Path("tiny"), gradient_checkpointing=True), tmp_path, "cpu",
                       has_eval=False)
    assert (plain.loss_type, plain.loss_weights) == (["sigmoid"], [1.0])
    assert plain.gradient_checkpointing is True


# --------------------------------------------------------------------------- the reference
def setup(job: TrainingSpec, tokenizer: Any, pairs: dict[str, tuple[Path, str]],
          out: Path) -> tuple[Any, Any]:
    method = method_for(job)
    data = method.prepare(job, tokenizer, *pairs["train"])
    return method.setup(job, tokenizer, data, out, "cpu", JobCallback(Hooks(), job, 0)), data


def test_a_new_adapter_is_scored_against_the_base_model(
        tiny_model: Path, tiny_tokenizer: Any, pairs: dict[str, tuple[Path, str]],
        tmp_path: Path) -> None:
    """LoRA through ``peft_config``: one adapter, the reference is the same model with it
    disabled, i.e. the base model, so a fresh adapter's rewards are exactly 0 at step 0."""
    built, data = setup(dpo_spec(tiny_model), tiny_tokenizer, pairs, tmp_path / "ckpt")
    batch = built.trainer.data_collator([data.train[i] for i in range(4)])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()

    at_start = built.trainer.evaluate(data.train)
    ref_chosen, ref_rejected = built.trainer.compute_ref_log_probs(built.model, batch)

    assert list(built.model.peft_config) == ["default"], "no copy of the model or adapter"
    assert at_start["eval_rewards/chosen"] == at_start["eval_rewards/rejected"] == 0.0
    assert at_start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    expected = sequence_logps(base, batch)
    assert torch.cat([ref_chosen, ref_rejected]).tolist() == pytest.approx(expected.tolist(),
                                                                           abs=1e-2)


def test_a_continued_sft_adapter_is_its_own_reference(
        tiny_model: Path, tiny_tokenizer: Any, pairs: dict[str, tuple[Path, str]],
        tmp_path: Path) -> None:
    """DPO after SFT: the reference is the SFT policy (TRL's frozen ``ref`` copy of the adapter
    the job continues), before and after DPO steps, not the bare base model."""
    sft_file, sft_hash = write(tmp_path / "sft.jsonl", dialogsum_records(8))
    sft_job = supervised_spec(model=str(tiny_model), max_steps=3, learning_rate=5e-3,
                              lora=LoraSpec(r=4, alpha=8))
    sft = train_adapter(sft_job, tiny_tokenizer, prepare(sft_job, tiny_tokenizer, sft_file,
                                                         sft_hash),
                        tmp_path / "sft-ckpt", tmp_path / "sft-adapter", device="cpu")
    assert sft.adapter_dir is not None
    key = storage.adapter_key("ftjob-sft", 1)  # where the job's runner commits it
    folders.commit_folder(storage.get_store(), sft.adapter_dir, key)
    job = dpo_spec(tiny_model, max_steps=2, initial_model="ft:tiny::ftjob-sft",
                   initial_adapter=key)
    built, data = setup(job, tiny_tokenizer, pairs, tmp_path / "ckpt")
    batch = built.trainer.data_collator([data.train[i] for i in range(4)])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    sft_policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32),
        str(sft.adapter_dir)).eval()
    expected, bare = sequence_logps(sft_policy, batch), sequence_logps(base, batch)

    at_start = built.trainer.evaluate(data.train)
    before = torch.cat(built.trainer.compute_ref_log_probs(built.model, batch))
    built.trainer.train()
    after = torch.cat(built.trainer.compute_ref_log_probs(built.model, batch))
    policy = sequence_logps(built.model, batch)

    assert list(built.model.peft_config) == ["default", "ref"]
    assert built.trainable == sum(p.numel() for n, p in built.model.named_parameters()
                                  if ".default." in n and "lora_" in n)
    assert at_start["eval_rewards/margins"] == 0.0, "the policy starts as its reference"
    assert (expected - bare).abs().min() > 0.1, "the SFT adapter moved the model"
    assert before.tolist() == pytest.approx(expected.tolist(), abs=1e-2)
    assert after.tolist() == pytest.approx(expected.tolist(), abs=1e-2), "the reference is frozen"
    assert (policy - expected).abs().max() > 1e-2, "the policy trained away from it"


# --------------------------------------------------------------------------- a DPO run
def test_a_dpo_run_reports_rewards_and_delivers_a_plain_adapter(
        tiny_model: Path, tiny_tokenizer: Any, pairs: dict[str, tuple[Path, str]],
        tmp_path: Path) -> None:
    job = dpo_spec(tiny_model, max_steps=4, save_steps=2, logging_steps=1)
    data = method_for(job).prepare(job, tiny_tokenizer, *pairs["train"], *pairs["valid"])
    hooks = Recorder()

    result = train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt", tmp_path / "adapter",
                           device="cpu", hooks=hooks, adapter_meta={"fine_tuned_model": "ft:t"})

    train = of(TrainMetrics, hooks.events)
    valid = of(ValidationMetrics, hooks.events)
    checkpoints = of(CheckpointInfo, hooks.events)
    full = of(FullValidationMetrics, hooks.events)
    assert [m.step for m in train] == [1, 2, 3, 4]
    assert all(set(m.extra) == set(METRICS) for m in train)
    assert train[0].extra["rewards/margins"] == 0.0 and train[0].train_loss == pytest.approx(
        math.log(2), abs=1e-6)
    assert train[-1].extra["rewards/margins"] > 0, "the preferred answers gain on the others"
    assert [m.step for m in valid] == [2, 4]
    assert all(set(m.extra) == {f"valid_{n}" for n in METRICS} for m in valid)
    assert [c.step for c in checkpoints] == [2, 4]
    assert checkpoints[-1].metrics()["valid_rewards/accuracies"] == valid[-1].extra[
        "valid_rewards/accuracies"]
    assert full[0].extra["full_valid_rewards/margins"] == valid[-1].extra[
        "valid_rewards/margins"]
    # The results file: OpenAI's columns, then the rewards, every step.
    lines = results_csv(result.metrics, results_columns(METRICS)).decode().splitlines()
    assert lines[0].split(",") == ["step", "train_loss", "train_accuracy", "valid_loss",
                                   "valid_mean_token_accuracy", *METRICS,
                                   *(f"valid_{n}" for n in METRICS)]
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert lines[2].split(",")[-6] == repr(valid[0].extra["valid_rewards/chosen"])
    # The adapter: PEFT's files of the one trained adapter, loadable, with its parity probe.
    assert result.adapter_dir is not None
    assert sorted(p.name for p in result.adapter_dir.iterdir() if p.is_dir()) == []
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
    assert meta["parity_probe"]["token_ids"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                                       str(result.adapter_dir))
    assert list(loaded.peft_config) == ["default"]
