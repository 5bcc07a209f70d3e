"""Preference pairs, the records of a DPO job, in OpenAI's format.

One line of a preference file::

    {"input": {"messages": [...], "tools": [...], "parallel_tool_calls": true},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

``input.messages`` is a conversation that does not end with the assistant: both outputs answer
it, one assistant message each. ``tools`` and ``parallel_tool_calls`` are optional. Messages
and tools are checked by the chat records' checks (:mod:`shared.chat`, OpenAI's rules: tool
calls, tool messages, text parts), and errors name the path in the record
(``preferred_output[0].content must be a string or a list of text parts``).

The shape registers itself with :mod:`shared.records` (``records.READERS``), so an upload, a
job's file check and preprocessing read preference files as they read any other: an upload of
one is reported as ``record_format: "preference"``. A record becomes the
:class:`~shared.records.Example` of its preferred answer: a chat of the input and the preferred
message, the latter learned, so the chat format renders it (tools included) as it renders a
chat record; :func:`pair` gives the chosen and the rejected example.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from shared.chat import Chat, RecordError, call_ids, check_messages, check_reply, check_tools
from shared.hermes import assistant_text
from shared.records import READERS, Example, MissingColumn

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
    tools = (check_tools(given["tools"], path="input.tools")
             if given.get("tools") is not None else None)
    parallel = given.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RecordError("'input.parallel_tool_calls' must be true or false")
    messages = check_messages(given["messages"], path="input.messages")
    if messages[-1]["role"] == "assistant":
        raise RecordError(
            f"input.messages[{len(messages) - 1}] is the assistant's: the input must end before "
            "the answer, which preferred_output and non_preferred_output give")
    made = call_ids(messages)
    preferred = check_reply(record[OUTPUTS[0]], path=OUTPUTS[0], call_ids=made)
    check_reply(record[OUTPUTS[1]], path=OUTPUTS[1], call_ids=made)
    users = [m["content"] for m in messages if m["role"] == "user" and m.get("content")]
    chat = Chat([*messages, preferred], tools, parallel, learned=(len(messages),))
    return Example(
        instruction=instruction,
        input="\n".join(users) or None,
        output=assistant_text(preferred),
        messages=chat.messages,
        fields=record,
        shape=SHAPE,
        chat=chat,
    )


def pair(example: Example) -> tuple[Example, Example]:
    """The chosen (preferred) and rejected (non-preferred) examples of a record read by
    :func:`read`: the same prompt, two answers."""
    if example.shape != SHAPE or example.chat is None:
        raise ValueError(f"a {example.shape} record is not a preference pair")
    prompt = example.chat.messages[:-1]
    rejected = check_reply(example.fields[OUTPUTS[1]], path=OUTPUTS[1],
                           call_ids=call_ids(prompt))
    chat = replace(example.chat, messages=[*prompt, rejected])
    return example, replace(example, output=assistant_text(rejected), messages=chat.messages,
                            chat=chat)


READERS[SHAPE] = read
