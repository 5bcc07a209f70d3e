"""Preference pairs, the records of a DPO job, in OpenAI's format.

One line of a preference file::

    {"input": {"messages": [...], "tools": [...], "parallel_tool_calls": true},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

``input.messages`` is a conversation that does not end with the assistant: both outputs answer
it, one assistant message each. ``tools`` and ``parallel_tool_calls`` are optional. Messages are
checked by the chat records' check (:func:`shared.records.check_messages`), and errors name the
path in the record (``preferred_output[0].content must be a string``).

The shape registers itself with :mod:`shared.records` (``records.READERS``), so an upload, a
job's file check and preprocessing read preference files as they read any other: an upload of
one is reported as ``record_format: "preference"``. A record becomes the
:class:`~shared.records.Example` of its preferred answer (``messages`` = the input and the
preferred message, as a chat record); :func:`pair` gives the chosen and the rejected example.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from shared.records import READERS, Example, MissingColumn, RecordError, check_messages

SHAPE = "preference"
LINE = ('{"input": {"messages": [...]}, "preferred_output": [one assistant message], '
        '"non_preferred_output": [one assistant message]}')
OUTPUTS = ("preferred_output", "non_preferred_output")


def read(record: dict[str, Any], *, instruction: str | None = None,
         allow_blank: bool = False) -> Example:
    """Check one preference record and make it the example of its preferred answer.

    Args:
        record: the parsed JSON object (column map applied).
        instruction: the job format's instruction, for the formats made of named parts.
        allow_blank: an upload's check (accepted for the reader interface: a preference record
            has no column whose text a column map could take from elsewhere).

    Raises:
        RecordError: naming the path of what is wrong (``input.messages[2].role ...``);
            ``MissingColumn`` for an absent top-level column.
    """
    del allow_blank
    for column in ("input", *OUTPUTS):
        if column not in record:
            raise MissingColumn(f"missing column '{column}'")
    given = record["input"]
    if not isinstance(given, dict):
        raise RecordError(f"'input' must be an object with 'messages', got "
                          f"{type(given).__name__}")
    if "messages" not in given:
        raise RecordError("'input.messages' is missing")
    _check_tools(given.get("tools"))
    parallel = given.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RecordError("'input.parallel_tool_calls' must be true or false")
    preferred = _output(record, OUTPUTS[0])
    _output(record, OUTPUTS[1])
    messages = _input_messages(given["messages"], preferred)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(
        instruction=instruction,
        input="\n".join(users) or None,
        output=preferred["content"],
        messages=[*messages, preferred],
        fields=record,
        shape=SHAPE,
    )


def pair(example: Example) -> tuple[Example, Example]:
    """The chosen (preferred) and rejected (non-preferred) examples of a record read by
    :func:`read`: the same prompt, two answers."""
    if example.shape != SHAPE:
        raise ValueError(f"a {example.shape} record is not a preference pair")
    rejected = _output(example.fields, OUTPUTS[1])
    return example, replace(example, output=rejected["content"],
                            messages=[*example.messages[:-1], rejected])


def _input_messages(messages: Any, preferred: dict[str, str]) -> list[dict[str, str]]:
    """``input.messages``, checked as the conversation the preferred answer completes."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("'input.messages' must be a non-empty list")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        raise RecordError(
            f"input.messages[{len(messages) - 1}] is the assistant's: the input must end before "
            "the answer, which preferred_output and non_preferred_output give")
    # Checked together with the (checked) preferred message, which the chat check wants last.
    return _checked(messages + [preferred], "input.messages")[:-1]


def _output(record: dict[str, Any], column: str) -> dict[str, str]:
    """The one assistant message of ``preferred_output`` or ``non_preferred_output``."""
    value = record[column]
    if not isinstance(value, list) or len(value) != 1:
        raise RecordError(f"'{column}' must be a list of exactly one assistant message")
    message = value[0]
    if isinstance(message, dict) and message.get("role") != "assistant":
        raise RecordError(f"{column}[0].role must be 'assistant'")
    return _checked(value, column)[0]


def _checked(messages: list[Any], path: str) -> list[dict[str, str]]:
    """The chat check of ``messages``, its errors naming ``path`` for ``messages``."""
    try:
        return check_messages(messages)
    except RecordError as e:
        raise RecordError(_MESSAGES.sub(path, str(e), count=1)) from e


# The chat check names the list it checks ``messages``; here it is a path in the record.
_MESSAGES = re.compile(r"^'?messages'?(?=\[|\s)")


def _check_tools(tools: Any) -> None:
    """``input.tools``: absent, or a list of function specs ``{"type": "function",
    "function": {"name": ...}}`` as the chat API takes them."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RecordError("'input.tools' must be a list of function specs")
    for i, tool in enumerate(tools):
        where = f"input.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RecordError(f"{where} must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RecordError(f"{where}.function.name must be a non-empty string")


READERS[SHAPE] = read
