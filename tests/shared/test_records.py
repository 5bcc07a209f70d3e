"""Record shapes, column maps and the errors that name what is wrong."""

from __future__ import annotations

import pytest

from shared.records import (
    DEFAULT_INSTRUCTION,
    RecordError,
    apply_column_map,
    detect_shape,
    to_example,
)


@pytest.mark.parametrize(("record", "shape"), [
    ({"dialogue": "d", "summary": "s"}, "dialogsum"),
    ({"dialogue": "d", "summary": "s", "id": "x", "topic": "t"}, "dialogsum"),
    ({"instruction": "i", "response": "r"}, "dolly"),
    ({"instruction": "i", "context": "c", "response": "r", "category": "qa"}, "dolly"),
    ({"prompt": "p", "completion": "c"}, "completion"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "chat"),
    ({"conversation": "d", "gist": "s"}, None),
])
def test_detect_shape(record: dict, shape: str | None) -> None:
    assert detect_shape(record) == shape


def test_dialogsum_record() -> None:
    ex = to_example({"id": "train_1", "dialogue": "D", "summary": "S", "topic": "T"})

    assert (ex.shape, ex.instruction, ex.input, ex.output) == ("dialogsum", DEFAULT_INSTRUCTION,
                                                               "D", "S")
    assert ex.fields["topic"] == "T"


def test_dialogsum_instruction_can_be_replaced() -> None:
    ex = to_example({"dialogue": "D", "summary": "S"}, instruction="Summarise briefly.")

    assert ex.instruction == "Summarise briefly."


def test_dolly_record_with_and_without_context() -> None:
    with_ctx = to_example({"instruction": "I", "context": "C", "response": "R"})
    without = to_example({"instruction": "I", "context": "", "response": "R"})

    assert (with_ctx.shape, with_ctx.instruction, with_ctx.input, with_ctx.output) == (
        "dolly", "I", "C", "R")
    assert without.input is None


def test_completion_record() -> None:
    ex = to_example({"prompt": "P", "completion": "C"})

    assert (ex.shape, ex.instruction, ex.input, ex.output) == ("completion", None, "P", "C")


def test_chat_record_targets_the_last_assistant_turn() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    ex = to_example({"messages": messages})

    assert ex.shape == "chat"
    assert ex.output == "A2"
    assert ex.input == "U1\nU2"
    assert ex.messages == messages


def test_column_map_renames_their_columns_to_ours() -> None:
    record = {"conversation": "D", "gist": "S"}
    column_map = {"dialogue": "conversation", "summary": "gist"}

    assert apply_column_map(record, column_map) == {**record, "dialogue": "D", "summary": "S"}
    ex = to_example(record, column_map=column_map)
    assert (ex.shape, ex.input, ex.output) == ("dialogsum", "D", "S")


def test_column_map_ignores_absent_columns() -> None:
    assert apply_column_map({"a": 1}, {"dialogue": "conversation"}) == {"a": 1}
    assert apply_column_map({"a": 1}, None) == {"a": 1}


def test_unknown_columns_suggest_column_map() -> None:
    with pytest.raises(RecordError, match="column_map"):
        to_example({"conversation": "D", "gist": "S"})


@pytest.mark.parametrize(("record", "shape", "message"), [
    ({"dialogue": "D"}, "dialogsum", "missing column 'summary'"),
    ({"dialogue": "D", "summary": 3}, "dialogsum", "column 'summary' must be a string, got int"),
    ({"dialogue": "  ", "summary": "S"}, "dialogsum", "column 'dialogue' is empty"),
    ({"instruction": "I", "response": "R", "context": ["x"]}, "dolly",
     "column 'context' must be a string"),
    ({"prompt": None, "completion": "C"}, "completion", "missing column 'prompt'"),
])
def test_bad_columns_are_named(record: dict, shape: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        to_example(record, shape=shape)


@pytest.mark.parametrize(("messages", "message"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role must be one of"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "last message must have role 'assistant'"),
])
def test_bad_chat_messages(messages: object, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        to_example({"messages": messages})


@pytest.mark.parametrize("record", [["a", "b"], "text", 3, None])
def test_a_record_must_be_an_object(record: object) -> None:
    with pytest.raises(RecordError, match="must be a JSON object"):
        to_example(record)  # type: ignore[arg-type]


def test_unknown_forced_shape() -> None:
    with pytest.raises(RecordError, match="unknown record shape 'poem'"):
        to_example({"a": "b"}, shape="poem")
