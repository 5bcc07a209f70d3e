"""Tools and structured outputs of chat requests: how the prompt shows the tools, what vLLM's
structured outputs constrain, and how a reply becomes ``message.tool_calls``.

Tools are rendered in the *tool format* of the model (``modelio.chat_template``): by its own
chat template where that renders tools (``tools=``, as transformers passes them; assistant
``tool_calls`` and ``tool`` messages of the history too), or, for an adapter fine-tuned on chats
with tools over a template that renders none, in the Hermes format it learned (the format its
``lorafleet.json`` stores, ``shared.hermes``). Calls are read back in the Hermes format both
teach: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.
``tool_choice: "auto"`` lets the model choose; a named function or ``"required"`` puts the
opening ``<tool_call>`` at the end of the prompt and constrains the rest to the call's JSON (the
name, and the arguments' JSON schema), so the call always parses and its arguments validate.
``response_format`` constrains the reply to JSON or to a JSON schema. Constraints go to vLLM
as ``structured_outputs`` (xgrammar, no free whitespace).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from modelio.model_text import ModelText
from shared.hermes import CALL_END, CALL_START, ToolFormat
from shared.inference import ChatCompletionRequest, ChatMessage, NamedToolChoice
from shared.request_fields import UnsupportedParameter

_CALL = re.compile(re.escape(CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(CALL_END) + r"|$)",
                   re.DOTALL)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates take it: assistant tool calls with their arguments
    as objects (templates write them with ``tojson``), tool results with their call's id."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.name:
            item["name"] = m.name
        out.append(item)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise UnsupportedParameter(f"messages: tool call arguments are not JSON: {e}",
                                   param="messages") from e


def render(host: ModelText, req: ChatCompletionRequest,
           taught: ToolFormat | None = None) -> str:
    """The prompt of a chat request with tools (a forced call: its opening tag included).

    Args:
        taught: the tool format the adapter was trained in (its ``lorafleet.json``), which
            renders the request as training rendered its chats; None: a base model, or an
            adapter never trained on tools.

    Raises:
        UnsupportedParameter: the model's chat template does not show tools and no adapter was
            taught them in the Hermes format.
    """
    tool_format = taught or host.tool_format()
    if tool_format == "hermes" and taught is None:
        raise UnsupportedParameter(
            f"'tools' is not supported by the model '{req.model}': its chat template does not "
            "render tools, and it was not fine-tuned on chats with tools (a model fine-tuned "
            "on them takes tools in the format it learned)", param="tools")
    tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools or []]
    prompt = host.render_chat(message_dicts(req.messages), True, tools, tool_format=tool_format)
    return prompt + CALL_START + "\n" if forced(req) else prompt


def forced(req: ChatCompletionRequest) -> bool:
    """Whether the reply must be a tool call (a named function, or ``"required"``)."""
    return bool(req.tools) and (req.tool_choice == "required"
                                or isinstance(req.tool_choice, NamedToolChoice))


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "name": {"const": name},
        "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False}


def structured_outputs(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """vLLM's ``structured_outputs`` for the request, if its reply is constrained."""
    if forced(req):
        tools = req.tools or []
        if isinstance(req.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == req.tool_choice.function.name]
        schemas = [_call_schema(t.function.name, t.function.parameters) for t in tools]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return {"json": schema, "disable_any_whitespace": True}
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True, "disable_any_whitespace": True}
    assert fmt.json_schema is not None
    return {"json": fmt.json_schema.schema_ or {"type": "object"},
            "disable_any_whitespace": True}


def _call(payload: Any) -> dict[str, Any] | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {
        "name": payload["name"],
        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def parse_reply(text: str, req: ChatCompletionRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """A reply's content and its tool calls (none unless the request offers tools)."""
    if not req.calls_tools:
        return text, []
    if forced(req):
        text = CALL_START + text  # the opening tag was the prompt's
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = _call(json.loads(match.group(1)))
        except ValueError:
            call = None
        if call is not None:
            calls.append(call)
    if not calls:
        return text.removeprefix(CALL_START) if forced(req) else text, []
    if req.parallel_tool_calls is False:
        calls = calls[:1]
    content = _CALL.sub("", text).strip()
    return content or None, calls
