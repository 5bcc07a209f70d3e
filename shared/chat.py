"""Chat records in OpenAI's whole shape, checked with OpenAI's rules and normalised.

A chat record is ``{"messages": [...], "tools": [...], "parallel_tool_calls": bool}`` (the last
two optional), as OpenAI's fine-tuning files and chat requests carry it:

* roles ``system``, ``developer`` (read as ``system``), ``user``, ``assistant`` and ``tool``;
  ``name`` on any message;
* ``content`` a string or a list of text parts (``{"type": "text", "text": ...}``, joined);
* an assistant message may carry ``tool_calls`` (``[{"id", "type": "function", "function":
  {"name", "arguments"}}]``, ``arguments`` a string holding a JSON object) and then no
  ``content``; a ``tool`` message answers one earlier call by ``tool_call_id``;
* ``weight`` (0 or 1) on an assistant message says whether it is learned; every assistant
  message without ``weight: 0`` is.

Normalised messages are plain dicts in OpenAI's shape: ``{"role", "content"}`` with content a
string (``None`` on an assistant message that only calls tools), plus ``name``, ``tool_calls``
(arguments still a JSON string) or ``tool_call_id`` where the message had them; ``weight`` is
taken out (:attr:`Chat.learned` holds it).

Errors are ``RecordError`` naming the path of the bad value, e.g.
``messages[3].tool_calls[0].function.arguments is not valid JSON``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's rule for function names (tools and calls alike).
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME = 64


class RecordError(ValueError):
    """A record that does not fit; the message says which column and why."""


class FormatMismatch(RecordError):
    """A record the job's prompt format cannot train as the user meant it; the fix is the
    job's ``prompt_format``, which the error names (``param``)."""

    param = "prompt_format"


@dataclass(frozen=True)
class Chat:
    """A checked chat record."""

    messages: list[dict[str, Any]]  # normalised, see the module's docstring
    tools: list[dict[str, Any]] | None  # function specs as given; None when the record has none
    parallel_tool_calls: bool | None
    learned: tuple[int, ...]  # indices of the assistant messages learned (weight not 0)

    @property
    def uses_tools(self) -> bool:
        """Whether the chat declares tools, calls one, or answers a call."""
        return bool(self.tools) or any("tool_calls" in m or m["role"] == "tool"
                                       for m in self.messages)

    @property
    def single_turn(self) -> bool:
        """Whether a one-turn prompt format (learning the last message from the user text
        before it) trains this chat as it is meant: no tools, only the last message learned."""
        return not self.uses_tools and self.learned == (len(self.messages) - 1,)


def check_chat(record: dict[str, Any]) -> Chat:
    """Check a chat record (``messages``, optional ``tools`` and ``parallel_tool_calls``).

    Beyond :func:`check_messages`: the last message is the assistant's (the training target),
    at least one assistant message is learned, calls name declared tools, and with
    ``parallel_tool_calls: false`` no message makes more than one call.

    Raises:
        RecordError: naming the path of the first bad value.
    """
    if "messages" not in record:
        raise RecordError("missing column 'messages'")
    tools = check_tools(record["tools"]) if record.get("tools") is not None else None
    parallel = record.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RecordError("parallel_tool_calls must be true or false")
    messages, weights = _check_messages(record["messages"], "messages")
    if messages[-1]["role"] != "assistant":
        raise RecordError("the last message must have role 'assistant' (the training target)")
    learned = tuple(i for i, m in enumerate(messages)
                    if m["role"] == "assistant" and weights.get(i, 1) != 0)
    if not learned:
        raise RecordError("messages: no assistant message is learned (each has weight 0)")
    declared = {t["function"]["name"] for t in tools or []}
    for i, message in enumerate(messages):
        calls = message.get("tool_calls", [])
        if parallel is False and len(calls) > 1:
            raise RecordError(f"messages[{i}].tool_calls has {len(calls)} calls, but "
                              "parallel_tool_calls is false")
        for j, call in enumerate(calls):
            name = call["function"]["name"]
            if declared and name not in declared:
                raise RecordError(f"messages[{i}].tool_calls[{j}].function.name '{name}' is "
                                  f"not one of the tools ({', '.join(sorted(declared))})")
    return Chat(messages, tools, parallel, learned)


def check_messages(messages: Any, *, path: str = "messages") -> list[dict[str, Any]]:
    """Check a list of messages with OpenAI's rules and normalise it.

    Usable on any list of messages: a chat record's, a preference record's ``input.messages``
    (``path="input.messages"``), or the one-message assistant answer of a preference pair
    (``path="preferred_output"``; :func:`check_reply` also checks that it is one assistant
    message). A ``tool`` message must answer a call made earlier in the same list.

    Returns:
        The normalised messages (see the module's docstring); ``weight`` is checked and
        dropped.

    Raises:
        RecordError: naming the path of the first bad value, e.g.
            ``input.messages[2].tool_calls[0].function.arguments is not valid JSON``.
    """
    return _check_messages(messages, path)[0]


def check_reply(output: Any, *, path: str, call_ids: frozenset[str] = frozenset()
                ) -> dict[str, Any]:
    """Check a list holding exactly one assistant message (a preference pair's
    ``preferred_output`` or ``non_preferred_output``) and normalise it.

    Args:
        call_ids: ids of the calls made in the prompt's messages; the reply's own calls must
            not reuse one.

    Raises:
        RecordError: naming the path, e.g. ``preferred_output[0].content must be a string or
            a list of text parts``.
    """
    if not isinstance(output, list) or len(output) != 1:
        raise RecordError(f"{path} must be a list of one assistant message")
    message = _check_message(output[0], f"{path}[0]", set(call_ids))[0]
    if message["role"] != "assistant":
        raise RecordError(f"{path}[0].role must be 'assistant'")
    return message


def call_ids(messages: list[dict[str, Any]]) -> frozenset[str]:
    """The ids of the tool calls in normalised ``messages``."""
    return frozenset(c["id"] for m in messages for c in m.get("tool_calls", []))


def check_tools(tools: Any, *, path: str = "tools") -> list[dict[str, Any]]:
    """Check function specs as OpenAI's chat API takes them: ``[{"type": "function",
    "function": {"name", "description"?, "parameters"?, "strict"?}}]``, names unique.

    Returns:
        ``tools`` as given (each spec is passed to chat templates unchanged).

    Raises:
        RecordError: naming the path, e.g. ``tools[1].function.name must match
            ^[A-Za-z0-9_-]{1,64}$``.
    """
    if not isinstance(tools, list):
        raise RecordError(f"{path} must be a list of function specs")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{path}[{i}]"
        if not isinstance(tool, dict):
            raise RecordError(f"{where} must be an object")
        if tool.get("type") != "function":
            raise RecordError(f"{where}.type must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{where}.function must be an object")
        name = _function_name(function.get("name"), f"{where}.function.name")
        if name in seen:
            raise RecordError(f"{where}.function.name '{name}' is declared twice")
        seen.add(name)
        if not isinstance(function.get("description", ""), str):
            raise RecordError(f"{where}.function.description must be a string")
        if not isinstance(function.get("parameters", {}), dict):
            raise RecordError(f"{where}.function.parameters must be a JSON schema object")
        if not isinstance(function.get("strict", False), bool):
            raise RecordError(f"{where}.function.strict must be true or false")
    return tools


# --------------------------------------------------------------------------- one message
def _check_messages(messages: Any, path: str) -> tuple[list[dict[str, Any]], dict[int, int]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"'{path}' must be a non-empty list")
    out: list[dict[str, Any]] = []
    weights: dict[int, int] = {}
    calls: set[str] = set()
    for i, raw in enumerate(messages):
        message, weight = _check_message(raw, f"{path}[{i}]", calls)
        out.append(message)
        if weight is not None:
            weights[i] = weight
    return out, weights


def _check_message(raw: Any, where: str, calls: set[str]) -> tuple[dict[str, Any], int | None]:
    """One message, normalised, and its weight; adds its calls' ids to ``calls`` (those
    before it, which a ``tool`` message may answer)."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where} must be an object")
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise RecordError(f"{where}.role must be one of {', '.join(ROLES)}")
    if "function_call" in raw:
        raise RecordError(f"{where}.function_call is OpenAI's deprecated form; use tool_calls")
    role = "system" if role == "developer" else role
    message: dict[str, Any] = {"role": role}
    content = _content(raw.get("content"), f"{where}.content")
    if role == "assistant":
        if "tool_calls" in raw:
            message["tool_calls"] = _tool_calls(raw["tool_calls"], f"{where}.tool_calls", calls)
        elif content is None:
            raise RecordError(f"{where} has neither content nor tool_calls")
    else:
        if content is None:
            raise RecordError(f"{where}.content must be a string or a list of text parts")
        if "tool_calls" in raw:
            raise RecordError(f"{where}.tool_calls is allowed on assistant messages only")
    message["content"] = content
    if role == "tool":
        call = raw.get("tool_call_id")
        if not isinstance(call, str) or not call:
            raise RecordError(f"{where}.tool_call_id must be the id of an earlier tool call")
        if call not in calls:
            raise RecordError(f"{where}.tool_call_id '{_short(call)}' matches no earlier "
                              "tool call")
        message["tool_call_id"] = call
    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise RecordError(f"{where}.name must be a string of 1 to {MAX_NAME} characters")
        message["name"] = name
    return message, _weight(raw, role, where)


def _weight(raw: dict[str, Any], role: str, where: str) -> int | None:
    if "weight" not in raw:
        return None
    weight = raw["weight"]
    # bool is an int in Python; JSON's true is not a weight.
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{where}.weight must be 0 or 1")
    if role != "assistant":
        raise RecordError(f"{where}.weight applies to assistant messages only")
    return int(weight)


def _content(value: Any, where: str) -> str | None:
    """Text of a content field: a string, or text parts joined (``None``: absent)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RecordError(f"{where} must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise RecordError(f"{where}[{j}] must be an object")
        if part.get("type") != "text":
            raise RecordError(f"{where}[{j}].type must be 'text' (lorafleet trains text "
                              "models)")
        if not isinstance(part.get("text"), str):
            raise RecordError(f"{where}[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts) if texts else None


def _tool_calls(value: Any, where: str, calls: set[str]) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where} must be a non-empty list")
    out = []
    for j, call in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RecordError(f"{here} must be an object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RecordError(f"{here}.id must be a non-empty string")
        if call_id in calls:
            raise RecordError(f"{here}.id '{_short(call_id)}' is the id of an earlier call")
        if call.get("type", "function") != "function":
            raise RecordError(f"{here}.type must be 'function'")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{here}.function must be an object")
        name = _function_name(function.get("name"), f"{here}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise RecordError(f"{here}.function.arguments must be a string (of JSON)")
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a number past the limit
            raise RecordError(f"{here}.function.arguments is not valid JSON") from e
        if not isinstance(parsed, dict):
            raise RecordError(f"{here}.function.arguments must be a JSON object")
        calls.add(call_id)
        out.append({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments}})
    return out


def _function_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not FUNCTION_NAME.match(value):
        raise RecordError(f"{where} must match {FUNCTION_NAME.pattern}")
    return value


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

