"""Training records: the accepted JSONL shapes and their normalised form.

Accepted shapes (detected per record, columns remappable per job with ``column_map``):

* ``dialogsum`` — ``dialogue``, ``summary`` (optional ``id``, ``topic``)
* ``dolly`` — ``instruction``, optional ``context``, ``response``
* ``completion`` — ``prompt``, ``completion``
* ``chat`` — ``messages``: a list of ``{"role", "content"}`` ending with an assistant turn
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # shape: (required columns, optional columns)
    "dialogsum": (("dialogue", "summary"), ("id", "topic")),
    "dolly": (("instruction", "response"), ("context", "category")),
    "completion": (("prompt", "completion"), ()),
    "chat": (("messages",), ()),
}
CHAT_ROLES = ("system", "user", "assistant")

DEFAULT_INSTRUCTION = "Summarize the below conversation."


class RecordError(ValueError):
    """A record that does not fit; the message says which column and why."""


@dataclass(frozen=True)
class Example:
    """A record in the form every prompt format consumes."""

    instruction: str | None
    input: str | None
    output: str
    messages: list[dict[str, str]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    shape: str = "custom"


def detect_shape(record: dict[str, Any]) -> str | None:
    """The first shape whose required columns the record has, else ``None``."""
    for shape, (required, _optional) in SHAPES.items():
        if all(col in record for col in required):
            return shape
    return None


def apply_column_map(record: dict[str, Any], column_map: dict[str, str] | None) -> dict[str, Any]:
    """Rename the user's columns to ours: ``column_map`` maps *our* name to *their* name."""
    if not column_map:
        return record
    out = dict(record)
    for ours, theirs in column_map.items():
        if theirs in record:
            out[ours] = record[theirs]
    return out


def _text(record: dict[str, Any], col: str, *, required: bool = True) -> str | None:
    value = record.get(col)
    if value is None:
        if required:
            raise RecordError(f"missing column '{col}'")
        return None
    if not isinstance(value, str):
        raise RecordError(f"column '{col}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"column '{col}' is empty")
    return value


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError(f"messages[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise RecordError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise RecordError("the last message must have role 'assistant' (the training target)")
    return out


def to_example(
    record: dict[str, Any],
    *,
    shape: str | None = None,
    column_map: dict[str, str] | None = None,
    instruction: str | None = None,
) -> Example:
    """Normalise one record.

    Args:
        record: the parsed JSON object.
        shape: force a shape; ``None`` detects it from the (mapped) columns.
        column_map: our column name → the user's column name.
        instruction: the instruction for shapes that carry none (DialogSum: "Summarize the
            below conversation.").

    Raises:
        RecordError: the record lacks a mapped column or has a wrong type.
    """
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    rec = apply_column_map(record, column_map)
    shape = shape or detect_shape(rec)
    if shape is None:
        expected = "; ".join(" + ".join(req) for req, _ in SHAPES.values())
        raise RecordError(
            f"record has none of the accepted column sets ({expected}); "
            "use column_map to name yours"
        )
    if shape not in SHAPES:
        raise RecordError(f"unknown record shape '{shape}'")
    if shape == "dialogsum":
        return Example(
            instruction=instruction or DEFAULT_INSTRUCTION,
            input=_text(rec, "dialogue"),
            output=_text(rec, "summary") or "",
            fields=rec,
            shape=shape,
        )
    if shape == "dolly":
        context = _text(rec, "context", required=False)
        return Example(
            instruction=_text(rec, "instruction"),
            input=context or None,
            output=_text(rec, "response") or "",
            fields=rec,
            shape=shape,
        )
    if shape == "completion":
        return Example(
            instruction=instruction,
            input=_text(rec, "prompt"),
            output=_text(rec, "completion") or "",
            fields=rec,
            shape=shape,
        )
    messages = check_messages(rec.get("messages"))
    prompt_turns = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    return Example(
        instruction=instruction,
        input="\n".join(prompt_turns) or None,
        output=messages[-1]["content"],
        messages=messages,
        fields=rec,
        shape=shape,
    )
