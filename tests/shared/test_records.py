"""Record shapes, column maps, the one check of records and files, and the errors that name
what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import InvalidDataset, PayloadTooLarge
from shared.records import (
    DEFAULT_INSTRUCTION,
    FileSummary,
    MissingColumn,
    RecordError,
    apply_column_map,
    detect_shape,
    to_example,
    validate_file,
    validate_record,
)
from shared.templates import PromptFormat
from tests.support.openai_chats import MULTI_TURN, drone_records


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


# --------------------------------------------------------------------------- the one check
def write(tmp_path: Path, *records: object) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CUSTOM = PromptFormat(type="custom", prompt_template="{dialogue}\n", response_template="{gist}")


def test_an_upload_checks_the_shape_but_leaves_empty_text_to_the_job() -> None:
    example = validate_record({"dialogue": " ", "summary": ""})

    assert (example.shape, example.input, example.output) == ("dialogsum", " ", "")
    with pytest.raises(RecordError, match="column 'dialogue' is empty"):
        validate_record({"dialogue": " ", "summary": ""}, prompt_format=PromptFormat())


def test_an_upload_takes_any_object_of_no_known_shape() -> None:
    example = validate_record({"conversation": ["not", "text"]})

    assert (example.shape, example.fields) == ("custom", {"conversation": ["not", "text"]})


def test_a_custom_template_needs_its_fields_after_the_column_map() -> None:
    record = {"conversation": "D", "summary": "S"}

    example = validate_record(record, column_map={"gist": "summary", "dialogue": "conversation"},
                              prompt_format=CUSTOM)
    with pytest.raises(MissingColumn, match="missing column 'dialogue' used by the template"):
        validate_record(record, prompt_format=CUSTOM)

    assert (example.fields["dialogue"], example.fields["gist"]) == ("D", "S")


def test_the_files_first_record_sets_the_shape_of_an_upload(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": "p", "completion": "c"}, {"instruction": "i",
                                                                "response": "r"})

    with pytest.raises(InvalidDataset, match=r"^line 2: missing column 'prompt' \(the file's "
                                             r"first record is completion-shaped"):
        validate_file(path)
    assert validate_file(path, prompt_format=PromptFormat()).shape == "completion"


def test_a_jobs_file_errors_name_the_field_and_the_column_map(tmp_path: Path) -> None:
    path = write(tmp_path, {"conversation": "D", "gist": "S"}, {"conversation": "D"})
    column_map = {"dialogue": "conversation", "summary": "gist"}

    with pytest.raises(InvalidDataset) as exc:
        validate_file(path, column_map=column_map, prompt_format=PromptFormat(),
                      param="validation_file")

    assert exc.value.message.startswith("validation_file line 2: record has none of")
    assert exc.value.message.endswith(f" (column_map: {column_map})")
    assert exc.value.param == "validation_file"


def test_a_file_summary(tmp_path: Path) -> None:
    path = write(tmp_path, {"conversation": "D", "gist": "S"}, {"conversation": "E", "gist": "T"})

    summary = validate_file(path, column_map={"dialogue": "conversation", "summary": "gist"},
                            prompt_format=PromptFormat())

    assert summary == FileSummary(count=2, shape="dialogsum",
                                  columns=["conversation", "dialogue", "gist", "summary"])


def test_an_empty_jobs_file_names_its_field(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n \n")

    with pytest.raises(InvalidDataset, match=r"^training_file line 1: the file is empty"):
        validate_file(path, prompt_format=PromptFormat(), param="training_file")


def test_lines_past_the_limit(tmp_path: Path) -> None:
    path = write(tmp_path, *[{"prompt": "p", "completion": "c"}] * 3)

    with pytest.raises(PayloadTooLarge, match=r"^line 3: more than 2 lines"):
        validate_file(path, max_lines=2)
    assert validate_file(path, max_lines=3).count == 3


# --------------------------------------------------------------------------- OpenAI's chat files
def test_openais_function_calling_file_is_a_chat_file(tmp_path: Path) -> None:
    path = write(tmp_path, *drone_records(6), MULTI_TURN)

    summary = validate_file(path)

    assert (summary.count, summary.shape) == (7, "chat")
    assert summary.columns == ["messages", "parallel_tool_calls", "tools"]
    assert validate_file(path, prompt_format=PromptFormat(type="chat")).count == 7


def test_a_bad_chat_line_is_named_with_its_path(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(MULTI_TURN))
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{'city': 'Paris'}"
    path = write(tmp_path, *drone_records(6), bad)

    with pytest.raises(InvalidDataset) as exc:
        validate_file(path)

    assert exc.value.message == (
        "line 7: messages[2].tool_calls[0].function.arguments is not valid JSON")
    assert exc.value.param == "file"


@pytest.mark.parametrize("fmt", [
    PromptFormat(type="dolly"), PromptFormat(type="phi2-qa"),
    PromptFormat(type="custom", prompt_template="{messages}", response_template="x"),
])
def test_a_one_turn_format_refuses_a_chat_that_means_more(tmp_path: Path,
                                                          fmt: PromptFormat) -> None:
    plain = {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}
    two_turns = {"messages": [*plain["messages"], {"role": "user", "content": "Bye"},
                              {"role": "assistant", "content": "Bye!"}]}
    earlier_unweighted = {"messages": [{**m, "weight": 0} if i == 1 else m
                                       for i, m in enumerate(two_turns["messages"])]}
    cases = [(two_turns, "has 2 assistant messages to learn"),
             (drone_records(1)[0], "uses tools"),
             ({"messages": [*two_turns["messages"][:3],
                            {"role": "assistant", "content": "Bye!", "weight": 0}]},
              "learns an assistant message that is not the last")]

    assert validate_file(write(tmp_path, plain, earlier_unweighted), prompt_format=fmt,
                         param="training_file").count == 2
    for record, what in cases:
        with pytest.raises(InvalidDataset) as exc:
            validate_file(write(tmp_path, plain, record), prompt_format=fmt,
                          param="training_file")

        assert exc.value.message == (
            f"training_file line 2: prompt_format '{fmt.type}' learns the last assistant "
            f"message only, and this chat {what}: train it with prompt_format 'chat' (the "
            "default for chat files)")
        assert exc.value.param == "prompt_format"
