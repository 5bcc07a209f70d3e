"""The Hermes text format of tools, for chat templates that render none.

Many chat templates render tool specs and tool calls themselves when given ``tools=`` (Qwen2.5
and Qwen3, Llama 3.1+, Mistral); others (SmolLM2's, any plain ChatML one) ignore them. For those,
lorafleet writes the tools into the messages as text, the way Hermes 2 Pro and Qwen2.5 do, so
that the template only ever sees plain ``{"role", "content"}`` messages:

* the tool specs go at the end of the system message (one is added when the chat has none), as
  one JSON object a line in a ``<tools>`` block, with the instructions of Qwen2.5's template;
* each call of an assistant message becomes
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after its content (one per
  line);
* tool messages become one user message of ``<tool_response>\\n...\\n</tool_response>`` blocks
  (consecutive tool messages share it).

vLLM's ``hermes`` tool parser reads such replies; :func:`parse_tool_calls` reads them the same
way. Pure text: no tokenizer here (``modelio.chat_template`` applies the template).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# How a chat with tools is rendered: by the chat template itself, or in this module's format
# (``modelio.chat_template`` decides by a probe; the adapter's ``lorafleet.json`` stores it).
ToolFormat = Literal["template", "hermes"]
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"
# A closed block, or one the generation cut short (as vLLM's hermes parser reads them).
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The system message's text that declares ``tools``."""
    specs = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_INTRO + specs + TOOLS_OUTRO


def arguments_object(call: dict[str, Any]) -> Any:
    """A call's arguments as a value: OpenAI's JSON string parsed (checked JSON, see
    ``shared.chat``), or as given when already parsed (as transformers' templates take them)."""
    arguments = call["function"]["arguments"]
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def call_text(call: dict[str, Any]) -> str:
    """One tool call (OpenAI's ``{"id", "type", "function": {"name", "arguments"}}``) as a
    ``<tool_call>`` block."""
    body = {"name": call["function"]["name"], "arguments": arguments_object(call)}
    return f"{CALL_START}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_END}"


def assistant_text(message: dict[str, Any]) -> str:
    """An assistant message's text in this format: its content, then its calls, a line
    each."""
    parts = [message["content"]] if message.get("content") else []
    parts += [call_text(call) for call in message.get("tool_calls", [])]
    return "\n".join(parts)


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                    ) -> list[dict[str, str]]:
    """Normalised OpenAI messages (``shared.chat``) and tools as plain ``{"role", "content"}``
    messages of the roles ``system``, ``user`` and ``assistant``.

    A chat without tools, calls or tool messages comes back as its roles and contents alone.
    """
    plain: list[dict[str, str]] = []
    answering = False  # the last message holds answers to calls: more join it
    for message in messages:
        role = message["role"]
        if role == "tool":
            block = f"{RESPONSE_START}\n{message['content']}\n{RESPONSE_END}"
            if answering:
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block})
            answering = True
            continue
        answering = False
        content = assistant_text(message) if role == "assistant" else message["content"]
        plain.append({"role": role, "content": content})
    if tools:
        block = tools_block(tools)
        if plain and plain[0]["role"] == "system":
            system = plain[0]["content"]
            plain[0] = {"role": "system", "content": f"{system}\n\n{block}" if system else block}
        else:
            plain.insert(0, {"role": "system", "content": block})
    return plain


@dataclass(frozen=True)
class ParsedReply:
    """A generated reply read back: the text before the first call, and the calls in
    OpenAI's shape (``{"id", "type": "function", "function": {"name", "arguments"}}``, the
    arguments a JSON string)."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_tool_calls(text: str, new_id: Callable[[], str] = new_call_id) -> ParsedReply:
    """Read the ``<tool_call>`` blocks of a generated reply (the Hermes format, which Qwen2.5's
    and Qwen3's templates also use).

    A block cut short by the end of generation is read too, as vLLM's ``hermes`` parser does.
    When any block is not a JSON object with a string ``name`` and an object ``arguments``,
    the reply is all content and no call (a model's malformed call is not guessed at).

    Args:
        new_id: makes each call's ``id``.

    Returns:
        The content (the text before the first block, stripped; ``None`` when empty) and the
        calls.
    """
    start = text.find(CALL_START)
    if start < 0:
        return ParsedReply(text)
    calls = []
    for match in _CALL.finditer(text):
        body = match.group(1) if match.group(1) is not None else match.group(2)
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return ParsedReply(text)
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return ParsedReply(text)
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            return ParsedReply(text)
        calls.append({"id": new_id(), "type": "function", "function": {
            "name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return ParsedReply(text[:start].strip() or None, calls)
