"""A tokenizer's chat template applied to OpenAI chats with tools, for training and inference
alike.

A chat with tools is rendered one of two ways, its *tool format*:

* ``"template"``: the chat template renders the tools and calls itself (``tools=`` of
  ``apply_chat_template``; Qwen2.5/Qwen3, Llama 3.1+ and Mistral templates do);
* ``"hermes"``: the template knows no tools (SmolLM2's, plain ChatML), so the tools, calls and
  tool answers are written into plain messages first (:mod:`shared.hermes`), and replies are
  read back with :func:`shared.hermes.parse_tool_calls` (vLLM's ``hermes`` tool parser reads
  them too).

:func:`probe_tool_format` tells which by rendering a probe conversation, never by the model's
name. Training stores the answer with the adapter (``lorafleet.json``, ``"tool_format"``), so
that inference renders requests exactly as training rendered the chats.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, cast, get_args

from jinja2 import TemplateError

from shared.hermes import ToolFormat, arguments_object, hermes_messages
from shared.templates import ChatRenderer

_PROBE_DESCRIPTION = "Probe description 7f3a1c"
_PROBE_VALUE = "probe value 5c1e9b"
_PROBE_RESULT = "probe result 9d2b4e"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "lorafleet_probe", "description": _PROBE_DESCRIPTION,
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}},
                   "required": ["probe_arg"]}}}]
# Mistral's templates want call ids of 9 letters and digits.
_PROBE_CALL = {"role": "assistant", "content": None, "tool_calls": [{
    "id": "lfprobe01", "type": "function", "function": {
        "name": "lorafleet_probe", "arguments": json.dumps({"probe_arg": _PROBE_VALUE})}}]}
_PROBE_CHAT = [
    {"role": "user", "content": "probe question"},
    _PROBE_CALL,
    {"role": "tool", "tool_call_id": "lfprobe01", "content": _PROBE_RESULT},
    {"role": "assistant", "content": "probe answer"},
]


def probe_tool_format(tokenizer: Any) -> ToolFormat:
    """``"template"`` if ``tokenizer``'s chat template renders tools, tool calls and tool
    answers itself, else ``"hermes"``.

    The probe renders a conversation with one tool, one call and its answer through the
    template with ``tools=``; the template counts as rendering tools when the tool's
    description, the call's argument value and the answer all appear in the text and the
    call's turn starts with the generation prompt (so it can be learned and served). A
    template that raises, or a tokenizer without one, is ``"hermes"``.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "hermes"
    try:
        text = render_chat(tokenizer, _PROBE_CHAT, False, _PROBE_TOOLS, tool_format="template")
        prompt = render_chat(tokenizer, _PROBE_CHAT[:1], True, _PROBE_TOOLS,
                             tool_format="template")
        turn = render_chat(tokenizer, _PROBE_CHAT[:2], False, _PROBE_TOOLS,
                           tool_format="template")
    except Exception:  # noqa: BLE001 - a template that cannot render the probe renders no tools
        return "hermes"
    rendered = all(marker in text for marker in (_PROBE_DESCRIPTION, _PROBE_VALUE,
                                                 _PROBE_RESULT))
    extends = turn.startswith(prompt) and _PROBE_VALUE in turn[len(prompt):]
    return "template" if rendered and extends else "hermes"


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, *, tool_format: ToolFormat) -> str:
    """Normalised OpenAI messages (``shared.chat``) and tools as text, in ``tool_format``.

    A chat without tools, calls or tool messages renders the same in both formats: the
    template applied to its messages as they are.

    Raises:
        ValueError: the template refuses the chat (a ``raise_exception`` in it, or a message
            it cannot render), with the template's reason.
    """
    if tool_format not in get_args(ToolFormat):
        raise ValueError(f"unknown tool format {tool_format!r}")
    kwargs: dict[str, Any] = {}
    if tool_format == "hermes":
        messages = hermes_messages(messages, tools)
    else:
        messages = [_template_message(m) for m in messages]
        if tools:
            kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except (TemplateError, TypeError) as e:  # TypeError: the template adds None to a string
        raise ValueError(f"the chat template cannot render this chat: {e}") from e
    return cast(str, text)


def chat_renderer(tokenizer: Any, tool_format: ToolFormat) -> ChatRenderer:
    """:func:`render_chat` of ``tokenizer`` in ``tool_format``, as ``shared.templates``
    renders with it."""
    return cast(ChatRenderer, partial(render_chat, tokenizer, tool_format=tool_format))


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: a call's arguments as an object (templates write
    them with ``tojson``), no ``content`` key on a message that only calls tools."""
    if "tool_calls" not in message:
        return message
    out = {k: v for k, v in message.items() if k != "content" or v is not None}
    out["tool_calls"] = [{**call, "function": {
        "name": call["function"]["name"], "arguments": arguments_object(call)}}
        for call in message["tool_calls"]]
    return out
