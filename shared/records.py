"""Training records: the accepted JSONL shapes, their normalised form, and the one check of a
record and of a JSONL file.

Accepted shapes (detected per record, columns remappable per job with ``column_map``):

* ``dialogsum`` — ``dialogue``, ``summary`` (optional ``id``, ``topic``)
* ``dolly`` — ``instruction``, optional ``context``, ``response``
* ``completion`` — ``prompt``, ``completion``
* ``chat`` — ``messages`` (optional ``tools``, ``parallel_tool_calls``): OpenAI's chat record,
  checked by :mod:`shared.chat`, ending with an assistant message
* ``preference`` — OpenAI's preference (DPO) pairs: ``input`` (``messages``, ``tools``,
  ``parallel_tool_calls``), ``preferred_output`` and ``non_preferred_output``; checked by
  :mod:`shared.preference`

An upload, a job's file check and preprocessing all read files with :func:`iter_examples` (or
:func:`validate_file`) and check records with :func:`validate_record`; they differ only in what
they know:

* an upload knows no job yet. Each line must be a JSON object; when the file's first record has
  a known shape, every record must have that shape's columns, with text where text belongs.
  Other files are ``custom``: each job's column map and format decide.
* a job's check and preprocessing know the job's ``column_map`` and ``prompt_format``: every
  record must become an example that format can render.

Errors name the line: ``line N: ...`` for an upload (its one ``file``), ``training_file line N:
...`` or ``validation_file line N: ...`` for a job, which names two files.
"""

from __future__ import annotations

import contextlib
import json
import string
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

from shared.chat import ROLES, Chat, FormatMismatch, RecordError, check_chat
from shared.errors import InvalidDataset, PayloadTooLarge
from shared.hermes import assistant_text

SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # shape: (required columns, optional columns)
    "dialogsum": (("dialogue", "summary"), ("id", "topic")),
    "dolly": (("instruction", "response"), ("context", "category")),
    "completion": (("prompt", "completion"), ()),
    "chat": (("messages",), ("tools", "parallel_tool_calls")),
    "preference": (("input", "preferred_output", "non_preferred_output"), ()),
}
# Columns that name a shape on their own: a record with one of them is checked as that shape
# (and told which of its columns it lacks) rather than passing as ``custom``.
MARKERS: dict[str, tuple[str, ...]] = {
    "preference": ("preferred_output", "non_preferred_output"),
}
CHAT_ROLES = ROLES

DEFAULT_INSTRUCTION = "Summarize the below conversation."
CUSTOM = "custom"  # the shape of a record with none of the known column sets
UPLOAD_PARAM = "file"  # the upload form's field
MAX_COLUMNS = 200  # column names kept in a file's summary


class MissingColumn(RecordError):
    """A record without a column its shape or template needs."""


@dataclass(frozen=True)
class Example:
    """A record in the form every prompt format consumes."""

    instruction: str | None
    input: str | None
    output: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    shape: str = CUSTOM
    chat: Chat | None = None  # a chat record, checked (its messages are ``messages``)


class ShapeReader(Protocol):
    """The check of a shape that lives in a module of its own (which builds on this one, so it
    registers itself in :data:`READERS`)."""

    def __call__(self, record: dict[str, Any], *, instruction: str | None,
                 allow_blank: bool) -> Example: ...


# shape -> its reader; ``shared.preference`` registers the preference shape (``shared``'s
# package init imports it, so the registration is in place before any record is read).
READERS: dict[str, ShapeReader] = {}


def detect_shape(record: dict[str, Any]) -> str | None:
    """The shape one of whose :data:`MARKERS` the record has, else the first shape whose
    required columns it has, else ``None``."""
    for shape, markers in MARKERS.items():
        if any(col in record for col in markers):
            return shape
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


def _text(
    record: dict[str, Any], col: str, *, required: bool = True, allow_blank: bool = False
) -> str | None:
    value = record.get(col)
    if value is None:
        if required:
            raise MissingColumn(f"missing column '{col}'")
        return None
    if not isinstance(value, str):
        raise RecordError(f"column '{col}' must be a string, got {type(value).__name__}")
    if required and not allow_blank and not value.strip():
        raise RecordError(f"column '{col}' is empty")
    return value


def to_example(
    record: dict[str, Any],
    *,
    shape: str | None = None,
    column_map: dict[str, str] | None = None,
    instruction: str | None = None,
    allow_blank: bool = False,
) -> Example:
    """Normalise one record.

    Args:
        record: the parsed JSON object.
        shape: force a shape; ``None`` detects it from the (mapped) columns.
        column_map: our column name → the user's column name.
        instruction: the instruction for shapes that carry none (DialogSum: "Summarize the
            below conversation.").
        allow_blank: accept required text that is empty or only spaces (an upload's check:
            until a job names its column map and format, an empty column may go unused).

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
    if shape in READERS:
        return READERS[shape](rec, instruction=instruction, allow_blank=allow_blank)
    text = partial(_text, rec, allow_blank=allow_blank)
    if shape == "dialogsum":
        return Example(
            instruction=instruction or DEFAULT_INSTRUCTION,
            input=text("dialogue"),
            output=text("summary") or "",
            fields=rec,
            shape=shape,
        )
    if shape == "dolly":
        context = text("context", required=False)
        return Example(
            instruction=text("instruction"),
            input=context or None,
            output=text("response") or "",
            fields=rec,
            shape=shape,
        )
    if shape == "completion":
        return Example(
            instruction=instruction,
            input=text("prompt"),
            output=text("completion") or "",
            fields=rec,
            shape=shape,
        )
    if "messages" not in rec:  # a forced shape: detection only finds chat with the column
        raise MissingColumn("missing column 'messages'")
    chat = check_chat(rec)
    prompt_turns = [m["content"] for m in chat.messages[:-1] if m["role"] == "user"]
    return Example(
        instruction=instruction,
        input="\n".join(prompt_turns) or None,
        output=assistant_text(chat.messages[-1]),
        messages=chat.messages,
        fields=rec,
        shape=shape,
        chat=chat,
    )


# --------------------------------------------------------------------------- checking
class RecordFormat(Protocol):
    """What the check of a record reads of a prompt format: ``shared.templates.PromptFormat``,
    named here by its shape because that module imports this one."""

    @property
    def type(self) -> str: ...
    @property
    def instruction(self) -> str | None: ...
    @property
    def prompt_template(self) -> str | None: ...
    @property
    def response_template(self) -> str | None: ...


@dataclass(frozen=True)
class FileSummary:
    """What one pass over a valid JSONL file found."""

    count: int  # records; blank lines are not records
    shape: str  # the first record's shape, or "custom"
    columns: list[str]  # column names seen (after the column map), sorted, at most MAX_COLUMNS


def validate_record(
    record: object,
    *,
    column_map: dict[str, str] | None = None,
    prompt_format: RecordFormat | None = None,
    shape: str | None = None,
) -> Example:
    """Check one parsed record and normalise it.

    Args:
        record: one line's JSON value.
        column_map: our column name → the user's column name, applied first.
        prompt_format: the job's format. Without one (an upload), only the columns of the
            record's shape are checked: present, and text where text belongs; empty text passes,
            as a job's column map may take its text from another column. A record of no known
            shape passes as ``custom``. With a format, the record must become an example the
            format renders: a ``custom`` template needs each of its fields among the columns,
            the other formats a known shape with non-empty text.
        shape: the shape the record must have; ``None`` detects it. ``"custom"`` (only without
            a format) accepts any object.

    Raises:
        RecordError: naming the column and what is wrong; ``MissingColumn`` for an absent one.
    """
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    rec = apply_column_map(record, column_map)
    if prompt_format is None:
        shape = shape or detect_shape(rec) or CUSTOM
        if shape == CUSTOM:
            return Example(instruction=None, input=None, output="", fields=rec)
        return to_example(rec, shape=shape, allow_blank=True)
    if prompt_format.type == "custom":
        needed = _template_fields(prompt_format.prompt_template or "",
                                  prompt_format.response_template or "")
        missing = [name for name in needed if name not in rec]
        if missing:
            raise MissingColumn(f"missing column '{missing[0]}' used by the template")
        if detect_shape(rec) == "chat":
            try:
                chat = check_chat(rec)
            except RecordError:
                chat = None  # messages the template does not read: the template decides
            if chat is not None:
                _check_one_turn(chat, prompt_format)
        return Example(instruction=prompt_format.instruction, input=None, output="", fields=rec)
    example = to_example(rec, shape=shape, instruction=prompt_format.instruction)
    if example.chat is not None and prompt_format.type != "chat":
        _check_one_turn(example.chat, prompt_format)
    return example


def _check_one_turn(chat: Chat, prompt_format: RecordFormat) -> None:
    """A one-turn format (dolly, phi2-qa, custom) learns the last message from the user text
    before it: refuse a chat that means more, rather than learn part of it."""
    if chat.single_turn:
        return
    if chat.uses_tools:
        what = "uses tools"
    elif len(chat.learned) > 1:
        what = f"has {len(chat.learned)} assistant messages to learn"
    else:
        what = "learns an assistant message that is not the last"
    raise FormatMismatch(
        f"prompt_format '{prompt_format.type}' learns the last assistant message only, and "
        f"this chat {what}: train it with prompt_format 'chat' (the default for chat files)")


def iter_examples(
    path: Path | Iterable[bytes],
    *,
    column_map: dict[str, str] | None = None,
    prompt_format: RecordFormat | None = None,
    param: str = UPLOAD_PARAM,
    max_lines: int | None = None,
    max_record_chars: int | None = None,
) -> Iterator[tuple[int, Example]]:
    """Read a JSONL file (a path, or its lines as they arrive) one line at a time and yield
    ``(line number, example)`` for each record (non-blank line), checked by
    :func:`validate_record`.

    Without a prompt format the first record's shape binds the file: every later record must
    have the same shape. With one, each record's shape is detected on its own.

    Args:
        param: the request field that named the file (``file`` for an upload,
            ``training_file`` or ``validation_file`` for a job); errors name it.
        max_lines: refuse a record past this line (an upload's limit).
        max_record_chars: refuse a line longer than this many characters.

    Raises:
        InvalidDataset: naming the first bad line: not UTF-8, too long, not JSON, not an object,
            a lone surrogate, or a record that :func:`validate_record` refuses.
        PayloadTooLarge: a record past ``max_lines``.
    """
    where = _where(param)
    file_shape: str | None = None
    with path.open("rb") if isinstance(path, Path) else contextlib.nullcontext(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if max_lines is not None and lineno > max_lines:
                raise PayloadTooLarge(f"{where} {lineno}: more than {max_lines} lines",
                                      param=param)
            try:
                value = _parse_line(raw, max_record_chars)
            except RecordError as e:
                raise InvalidDataset(f"{where} {lineno}: {e}", param=param) from e
            try:
                example = validate_record(value, column_map=column_map,
                                          prompt_format=prompt_format, shape=file_shape)
            except RecordError as e:
                hint = _hint(e, file_shape, column_map)
                raise InvalidDataset(f"{where} {lineno}: {e}{hint}",
                                     param=getattr(e, "param", param)) from e
            if prompt_format is None and file_shape is None:
                file_shape = example.shape
            yield lineno, example


def validate_file(
    path: Path | Iterable[bytes],
    *,
    column_map: dict[str, str] | None = None,
    prompt_format: RecordFormat | None = None,
    param: str = UPLOAD_PARAM,
    max_lines: int | None = None,
    max_record_chars: int | None = None,
) -> FileSummary:
    """Check every record of a JSONL file in one pass, holding one line at a time (and the
    column names). The arguments are those of :func:`iter_examples`.

    Raises:
        InvalidDataset: naming the first bad line, or line 1 of a file with no records.
        PayloadTooLarge: a record past ``max_lines``.
    """
    count, shape, columns = 0, CUSTOM, set[str]()
    for _lineno, example in iter_examples(
        path, column_map=column_map, prompt_format=prompt_format, param=param,
        max_lines=max_lines, max_record_chars=max_record_chars,
    ):
        if count == 0:
            shape = example.shape
        columns.update(example.fields)
        count += 1
    if count == 0:
        raise InvalidDataset(f"{_where(param)} 1: the file is empty (no JSONL records)",
                             param=param)
    return FileSummary(count=count, shape=shape, columns=sorted(columns)[:MAX_COLUMNS])


def _where(param: str) -> str:
    # An upload has one file, so "line 3" is enough; a job names two.
    return "line" if param == UPLOAD_PARAM else f"{param} line"


def _parse_line(raw: bytes, max_record_chars: int | None) -> object:
    """One line's JSON value; ``RecordError`` saying why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not valid UTF-8 ({e.reason})") from e
    if max_record_chars is not None and len(text) > max_record_chars:
        raise RecordError(f"record is {len(text)} characters, the limit is {max_record_chars}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg})") from e
    except RecursionError as e:
        raise RecordError("invalid JSON (nested too deeply)") from e
    except ValueError as e:  # int() refuses a literal longer than the interpreter's limit
        raise RecordError(
            f"invalid JSON (a number has more than {sys.get_int_max_str_digits()} digits)"
        ) from e
    if isinstance(value, dict) and "\\u" in text:
        _check_encodable(value)
    return value


def _check_encodable(value: object) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer, database or
    UTF-8 response can take."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(
            "a \\u escape makes a lone UTF-16 surrogate, which is not text (escape characters "
            "outside the BMP as a surrogate pair)"
        ) from e
    except RecursionError as e:  # parsed a few frames up the stack, not encodable down here
        raise RecordError("invalid JSON (nested too deeply)") from e


def _hint(error: RecordError, file_shape: str | None, column_map: dict[str, str] | None) -> str:
    if column_map:
        return f" (column_map: {column_map})"
    if isinstance(error, MissingColumn) and file_shape in SHAPES:
        required = SHAPES[file_shape][0]
        return f" (the file's first record is {file_shape}-shaped: {', '.join(required)})"
    return ""


@lru_cache(maxsize=64)
def _template_fields(prompt_template: str, response_template: str) -> tuple[str, ...]:
    """The fields of a custom format's templates, once per format rather than per record.
    ``PromptFormat`` has already refused any but plain names (``templates.template_fields``)."""
    parse = string.Formatter().parse
    return tuple(name for template in (prompt_template, response_template)
                 for _literal, name, _spec, _conversion in parse(template) if name is not None)
