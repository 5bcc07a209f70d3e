"""Tokenization for training: the seed's drop rule, loss masking, and the preprocessing cache."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")

from shared.errors import InvalidDataset  # noqa: E402
from shared.records import DEFAULT_INSTRUCTION  # noqa: E402
from shared.schemas import LoraSpec, TrainingSpec  # noqa: E402
from shared.templates import PromptFormat, Rendered  # noqa: E402
from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from worker.preprocess import IGNORE_INDEX, prepare, render_file, tokenize  # noqa: E402


def spec(**overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "model": "tiny", "training_file": "file-x", "lora": LoraSpec(),
        "prompt_format": PromptFormat(type="dolly", instruction=DEFAULT_INSTRUCTION),
        "max_length": 1024, "n_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4, "warmup": 0, "save_steps": 5, "logging_steps": 1,
        "train_on_inputs": False, "packing": False, "seed": 0,
    }
    return TrainingSpec(**{**values, **overrides})


def n_tokens(tokenizer: Any, r: Rendered) -> int:
    """Length of a training row as the worker builds it: prompt + response + EOS."""
    encode = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
    return len(encode) + len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) + 1


SAMPLE = Rendered("Instruct: say hello\nOutput:", " Hello there, friend.")


def test_rows_reaching_max_length_are_dropped_and_counted(tiny_tokenizer: Any) -> None:
    length = n_tokens(tiny_tokenizer, SAMPLE)
    short = Rendered("Instruct: hi\nOutput:", " Hi.")
    assert n_tokens(tiny_tokenizer, short) < length

    at_limit, dropped = tokenize([SAMPLE, short, SAMPLE], tiny_tokenizer, length, False)
    below_limit, none_dropped = tokenize([SAMPLE, short, SAMPLE], tiny_tokenizer, length + 1,
                                         False)

    assert dropped == 2  # len >= max_length is dropped, as in the seed recipe
    assert len(at_limit["input_ids"]) == 1
    assert none_dropped == 0
    assert [len(ids) for ids in below_limit["input_ids"]] == [length,
                                                              n_tokens(tiny_tokenizer, short),
                                                              length]


def test_labels_are_masked_on_the_prompt_by_default(tiny_tokenizer: Any) -> None:
    prompt_len = len(tiny_tokenizer(SAMPLE.prompt, add_special_tokens=False)["input_ids"])

    columns, _ = tokenize([SAMPLE], tiny_tokenizer, 1024, train_on_inputs=False)
    ids, labels = columns["input_ids"][0], columns["labels"][0]

    assert len(ids) == len(labels)
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id  # the model learns to stop
    assert tiny_tokenizer.decode(ids[prompt_len:-1]) == SAMPLE.response


def test_train_on_inputs_copies_input_ids(tiny_tokenizer: Any) -> None:
    columns, _ = tokenize([SAMPLE], tiny_tokenizer, 1024, train_on_inputs=True)

    assert columns["labels"][0] == columns["input_ids"][0]
    assert IGNORE_INDEX not in columns["labels"][0]


def test_render_file_names_the_bad_line(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl_bytes([*dialogsum_records(2), {"dialogue": "only a dialogue"}]))

    with pytest.raises(InvalidDataset, match="training_file line 3: "):
        render_file(path, spec(), tiny_tokenizer, "training_file")


# --------------------------------------------------------------------------- prepare + cache
@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(dialogsum_records(24)))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_reuses_its_cache(
    settings_env: Callable[..., Any], tiny_tokenizer: Any, data_file: tuple[Path, str]
) -> None:
    settings_env()
    path, digest = data_file

    first = prepare(spec(), tiny_tokenizer, path, digest)
    second = prepare(spec(), tiny_tokenizer, path, digest)
    # A max_length at the median sample length drops about half: whatever the data (the real
    # DialogSum or the project's shorter sample), a different length is a different cache entry.
    cut = sorted(len(ids) for ids in first.train["input_ids"])[first.examples // 2]
    other_length = prepare(spec(max_length=cut), tiny_tokenizer, path, digest)

    assert (first.cached, second.cached, other_length.cached) == (False, True, False)
    assert first.examples + first.dropped_too_long == 24
    assert (second.examples, second.dropped_too_long) == (first.examples,
                                                          first.dropped_too_long)
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.train["labels"] == first.train["labels"]
    assert other_length.dropped_too_long > first.dropped_too_long
    assert all(len(ids) < cut for ids in other_length.train["input_ids"])


def test_prepare_with_validation_file(
    settings_env: Callable[..., Any], tiny_tokenizer: Any, tmp_path: Path,
    data_file: tuple[Path, str],
) -> None:
    settings_env()
    path, digest = data_file
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(jsonl_bytes(dialogsum_records(6, split="validation")))

    data = prepare(spec(), tiny_tokenizer, path, digest, valid, "v-hash")
    again = prepare(spec(), tiny_tokenizer, path, digest, valid, "v-hash")

    assert data.validation is not None and len(data.validation) == data.validation_examples > 0
    assert again.cached and again.validation_examples == data.validation_examples


def test_prepare_fails_when_every_example_is_too_long(
    settings_env: Callable[..., Any], tiny_tokenizer: Any, data_file: tuple[Path, str]
) -> None:
    settings_env()
    path, digest = data_file

    with pytest.raises(InvalidDataset, match="all 24 examples reach max_length=16") as exc:
        prepare(spec(max_length=16), tiny_tokenizer, path, digest)
    assert exc.value.param == "max_length"
