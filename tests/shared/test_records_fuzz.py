"""Property-based checks of the one record check (``shared.records``): whatever a JSONL file
holds, the answer is its summary, or an ``InvalidDataset`` / ``PayloadTooLarge`` (a 4xx in the
API) that names the first bad line. Never any other exception.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.chat import check_chat
from shared.errors import InvalidDataset, PayloadTooLarge
from shared.hermes import hermes_messages
from shared.records import (
    SHAPES,
    Example,
    FileSummary,
    RecordError,
    iter_examples,
    validate_file,
    validate_record,
)
from shared.templates import PromptFormat, render
from tests.support.hostile_jsonl import (
    broken_chats,
    good_chats,
    json_values,
    jsonl_files,
    records,
)

# Seconds, not minutes: enough examples to reach each branch, fixed so that CI sees the same.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
LINE = re.compile(r"^(?:(?P<param>\w+) )?line (?P<n>\d+): ")
FORMATS = [
    PromptFormat(type="dolly"),
    PromptFormat(type="phi2-qa", instruction="Summarize."),
    PromptFormat(type="custom", prompt_template="Q: {prompt}\n", response_template="{completion}"),
]
COLUMN_MAPS = [None, {"prompt": "dialogue", "completion": "summary"}]
CHAT = PromptFormat(type="chat")


def chatml(messages: list[dict[str, Any]], add_generation_prompt: bool,
           tools: list[dict[str, Any]] | None = None) -> str:
    """A ChatML template in Python, tools in the Hermes format: a chat renderer without a
    tokenizer."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in hermes_messages(messages, tools))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
LIMITS = [{}, {"max_lines": 3, "max_record_chars": 2_000}]


def outcome(path: Path, content: bytes, **kwargs: Any) -> FileSummary | InvalidDataset:
    path.write_bytes(content)
    try:
        return validate_file(path, **kwargs)
    except (InvalidDataset, PayloadTooLarge) as e:  # PayloadTooLarge is no InvalidDataset
        return e  # type: ignore[return-value]


def assert_summary_or_first_bad_line(path: Path, content: bytes, **kwargs: Any) -> bool:
    """Check the answer for ``content``; whether the file was accepted."""
    result = outcome(path, content, **kwargs)
    lines = content.split(b"\n")
    numbered = [n for n, line in enumerate(lines, start=1) if line.strip()]
    if isinstance(result, FileSummary):
        assert result.count == len(numbered)
        return True
    param = kwargs.get("param", "file")
    match = LINE.match(result.message)
    assert match, result.message
    if result.param == "prompt_format":  # a one-turn format on a chat that means more
        assert f"prompt_format '{kwargs['prompt_format'].type}' learns" in result.message
    else:
        assert result.param == param
    assert match["param"] == (None if param == "file" else param), result.message
    n = int(match["n"])
    if not numbered:
        assert n == 1 and "the file is empty" in result.message
        return False
    assert n in numbered, result.message
    before = b"\n".join(lines[: n - 1])
    if before.strip():  # every record before the named line is good
        assert isinstance(outcome(path, before, **kwargs), FileSummary), result.message
    return False


@FUZZ
@given(content=jsonl_files(), limits=st.sampled_from(LIMITS))
def test_an_upload_is_summarised_or_its_first_bad_line_named(
    tmp_path: Path, content: bytes, limits: dict[str, int]
) -> None:
    assert_summary_or_first_bad_line(tmp_path / "data.jsonl", content, **limits)


@FUZZ
@given(content=jsonl_files(), fmt=st.sampled_from([*FORMATS, CHAT]),
       column_map=st.sampled_from(COLUMN_MAPS), param=st.sampled_from(["training_file",
                                                                        "validation_file"]))
def test_a_jobs_file_is_summarised_or_its_first_bad_line_named(
    tmp_path: Path, content: bytes, fmt: PromptFormat, column_map: dict[str, str] | None,
    param: str,
) -> None:
    path = tmp_path / "data.jsonl"
    accepted = assert_summary_or_first_bad_line(path, content, prompt_format=fmt,
                                                column_map=column_map, param=param)

    if accepted:  # what the check accepts, the format renders
        for _lineno, example in iter_examples(path, prompt_format=fmt, column_map=column_map,
                                              param=param):
            render(fmt, example, chatml)


@FUZZ
@given(record=good_chats())
def test_a_chat_in_openais_whole_shape_renders_every_learned_turn(record: dict[str, Any]) -> None:
    chat = check_chat(record)
    example = validate_record(record, prompt_format=CHAT)

    rendered = render(CHAT, example, chatml)

    segments = rendered.segments()
    assert "".join(text for text, _learned in segments) == rendered.text
    assert rendered.text == chatml(chat.messages, False, chat.tools)
    learned = "".join(text for text, is_learned in segments if is_learned)

    def turn(i: int) -> str:  # what assistant message i adds after the conversation before it
        before = chatml(chat.messages[:i], True, chat.tools)
        return chatml(chat.messages[: i + 1], False, chat.tools)[len(before):]

    assert learned == "".join(turn(i) for i in chat.learned)
    assert learned.count("<|im_end|>") == len(chat.learned)


@FUZZ
@given(record=records | json_values | broken_chats(), fmt=st.sampled_from([None, *FORMATS, CHAT]),
       column_map=st.sampled_from(COLUMN_MAPS),
       shape=st.sampled_from([None, "custom", *sorted(SHAPES)]))
def test_a_record_is_an_example_or_a_record_error(
    record: object, fmt: PromptFormat | None, column_map: dict[str, str] | None,
    shape: str | None,
) -> None:
    try:
        example = validate_record(record, column_map=column_map, prompt_format=fmt, shape=shape)
    except RecordError as e:
        assert str(e)
    else:
        assert isinstance(example, Example)
        assert isinstance(record, dict)


@pytest.mark.parametrize(("line", "says"), [
    (b'{"a": ' + b"1" * 5000 + b"}", "line 1: invalid JSON (a number has more than"),
    (b"[" * 100_000 + b"]" * 100_000, "line 1: invalid JSON (nested too deeply)"),
    (b"\xef\xbb\xbf{}", "line 1: invalid JSON (Unexpected UTF-8 BOM"),
    (b'{"a": "\\ud800"}', "line 1: a \\u escape makes a lone UTF-16 surrogate"),
    (b"\xed\xa0\x80", "line 1: not valid UTF-8"),
    (b"NaN", "line 1: expected a JSON object, got float"),
])
def test_pathological_lines_found_by_fuzzing(tmp_path: Path, line: bytes, says: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(line + b"\n")

    with pytest.raises(InvalidDataset) as exc:
        validate_file(path)

    assert exc.value.message.startswith(says)


def test_nan_infinity_and_extreme_numbers_are_data(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c", "x": [NaN, -Infinity, -0, 1e309]}\n')

    assert validate_file(path).count == 1
