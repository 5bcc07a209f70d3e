"""Preference (DPO) records in OpenAI's format: read as a record shape of their own, each bad
part named by its path in the record and its line in the file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared import preference
from shared.errors import InvalidDataset
from shared.records import MissingColumn, RecordError, detect_shape, validate_file, validate_record
from shared.templates import PromptFormat, render
from tests.support.preference import OPENAI_EXAMPLE, preference_pairs


def changed(path: str, value: Any) -> dict[str, Any]:
    """OpenAI's example with the value at ``path`` (dots and indexes) replaced; ``...`` deletes
    it."""
    record = copy.deepcopy(OPENAI_EXAMPLE)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = record
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return record


def test_openai_example_is_a_preference_record() -> None:
    example = validate_record(OPENAI_EXAMPLE, prompt_format=PromptFormat(type="chat"))
    chosen, rejected = preference.pair(example)

    assert detect_shape(OPENAI_EXAMPLE) == example.shape == "preference"
    assert chosen.output.startswith("Today in San Francisco")
    assert rejected.output == "It is not particularly cold in San Francisco today."
    assert chosen.input == rejected.input == OPENAI_EXAMPLE["input"]["messages"][0]["content"]
    assert [m["role"] for m in rejected.messages] == ["user", "assistant"]
    assert rejected.messages[-1]["content"] == rejected.output


def test_both_answers_render_after_the_same_prompt() -> None:
    pair = preference_pairs(1)[0]
    chosen, rejected = preference.pair(validate_record(pair, prompt_format=PromptFormat()))

    first, second = render(PromptFormat(), chosen), render(PromptFormat(), rejected)

    assert first.prompt == second.prompt
    assert pair["input"]["messages"][1]["content"] in first.prompt
    assert first.response.startswith(pair["preferred_output"][0]["content"])
    assert second.response.startswith(pair["non_preferred_output"][0]["content"])


@pytest.mark.parametrize(("path", "value", "message"), [
    ("input", ..., "missing column 'input'"),
    ("non_preferred_output", ..., "missing column 'non_preferred_output'"),
    ("input", "hello", "'input' must be an object with 'messages', got str"),
    ("input.messages", ..., "'input.messages' is missing"),
    ("input.messages", [], "'input.messages' must be a non-empty list"),
    ("input.messages.0.role", "robot", r"input.messages\[0\].role must be one of"),
    ("input.messages.0.content", 7, r"input.messages\[0\].content must be a string"),
    ("input.messages.0", {"role": "assistant", "content": "hi"},
     r"input.messages\[0\] is the assistant's: the input must end before the answer"),
    ("input.tools", {"name": "f"}, "input.tools must be a list of function specs"),
    ("input.tools", [{"type": "function", "function": {"name": ""}}],
     r"input.tools\[0\].function.name must match"),
    ("input.parallel_tool_calls", "yes", "'input.parallel_tool_calls' must be true or false"),
    ("preferred_output", [], "preferred_output must be a list of one assistant message"),
    ("preferred_output", {"role": "assistant", "content": "x"},
     "preferred_output must be a list of one assistant message"),
    ("preferred_output.0.role", "user", r"preferred_output\[0\].role must be 'assistant'"),
    ("preferred_output.0.content", None,
     r"preferred_output\[0\] has neither content nor tool_calls"),
    ("preferred_output.0.content", 7, r"preferred_output\[0\].content must be a string"),
    ("non_preferred_output.0", "text", r"non_preferred_output\[0\] must be an object"),
    ("non_preferred_output.0.content", ["a"],
     r"non_preferred_output\[0\].content\[0\] must be an object"),
])
def test_bad_parts_are_named_by_their_path(path: str, value: Any, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        validate_record(changed(path, value))
    with pytest.raises(RecordError, match=message):  # a job's check too
        validate_record(changed(path, value), prompt_format=PromptFormat(type="chat"))


def test_a_record_with_one_output_is_checked_as_a_pair_not_passed_as_custom() -> None:
    record = changed("non_preferred_output", ...)

    assert detect_shape(record) == "preference"
    with pytest.raises(MissingColumn, match="missing column 'non_preferred_output'"):
        validate_record(record)


def write(tmp_path: Path, *records: object) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_preference_file_is_summarised_as_such(tmp_path: Path) -> None:
    summary = validate_file(write(tmp_path, OPENAI_EXAMPLE, *preference_pairs(3)))

    assert (summary.count, summary.shape) == (4, "preference")
    assert summary.columns == ["input", "non_preferred_output", "preferred_output"]


def test_a_bad_line_of_a_preference_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, OPENAI_EXAMPLE, OPENAI_EXAMPLE,
                 changed("preferred_output.0.content", 3))

    with pytest.raises(InvalidDataset, match=r"^line 3: preferred_output\[0\].content must be "
                                             "a string or a list of text parts$"):
        validate_file(path)
    with pytest.raises(InvalidDataset, match=r"^training_file line 3: preferred_output\[0\]"):
        validate_file(path, prompt_format=PromptFormat(), param="training_file")


def test_a_chat_line_in_a_preference_file_is_named(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}

    with pytest.raises(InvalidDataset, match=r"^line 2: missing column 'input' \(the file's "
                                             r"first record is preference-shaped"):
        validate_file(write(tmp_path, OPENAI_EXAMPLE, chat))


def test_pair_refuses_other_records() -> None:
    with pytest.raises(ValueError, match="not a preference pair"):
        preference.pair(validate_record({"prompt": "p", "completion": "c"}))
