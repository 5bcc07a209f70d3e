"""Chat records in OpenAI's exact fine-tuning shapes, and a chat template that renders tools.

* :data:`DRONE_TOOLS` and :func:`drone_record`: the function-calling shape of OpenAI's cookbook
  (``examples/data/drone_training.jsonl``): tools at the top level, ``parallel_tool_calls:
  false``, a system and a user message, and an assistant message with ``tool_calls`` and no
  ``content``.
* :data:`MULTI_TURN`: a multi-turn chat with a ``developer`` message, text parts, a call
  answered by a ``tool`` message, and an assistant message with ``weight: 0``.
* :data:`QWEN25_TEMPLATE`: Qwen2.5-Instruct's chat template, which renders tools itself;
  :data:`PLAIN_CHATML`: a ChatML template that renders none (as SmolLM2's);
  :func:`with_chat_template`: a copy of a model folder with another template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

DRONE_SYSTEM = (
    "You are an intelligent AI that controls a drone. Given a command or request from the "
    "user, call one of your functions to complete the request. If the request cannot be "
    "completed by your available functions, call the reject_request function. If the request "
    "is ambiguous or unclear, reject the request."
)
DRONE_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "takeoff_drone", "description": "Initiate the drone's takeoff sequence.",
        "parameters": {"type": "object", "properties": {"altitude": {"type": "integer"}},
                       "required": ["altitude"]}}},
    {"type": "function", "function": {
        "name": "land_drone", "description": "Land the drone at its current location or a "
        "specified landing point.",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "enum": ["current", "home_base", "custom"]},
            "coordinates": {"type": "object"}}, "required": ["location"]}}},
    {"type": "function", "function": {
        "name": "set_drone_lighting", "description": "Control the drone's lighting.",
        "parameters": {"type": "object", "properties": {
            "mode": {"type": "string", "enum": ["on", "off", "blink", "sos"]}},
            "required": ["mode"]}}},
    {"type": "function", "function": {
        "name": "reject_request", "description": "Use this function if the request is not "
        "possible.", "parameters": {"type": "object", "properties": {}}}},
]
DRONE_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("Let's get the drone in the air, how high can it go?", "takeoff_drone", {"altitude": 100}),
    ("Bring the drone back home and land it.", "land_drone", {"location": "home_base"}),
    ("Turn on the lights, it is getting dark.", "set_drone_lighting", {"mode": "on"}),
    ("Can the drone make me a coffee?", "reject_request", {}),
    ("Land right where you are.", "land_drone", {"location": "current"}),
    ("Flash an SOS with the lights.", "set_drone_lighting", {"mode": "sos"}),
]


def drone_record(request: str, function: str, arguments: dict[str, Any],
                 tools: list[dict[str, Any]] = DRONE_TOOLS) -> dict[str, Any]:
    """One line of the cookbook's function-calling file (``tools``: all its tools, or
    fewer for a short context)."""
    call = {"id": "call_id", "type": "function",
            "function": {"name": function, "arguments": json.dumps(arguments)}}
    return {
        "messages": [
            {"role": "system", "content": DRONE_SYSTEM},
            {"role": "user", "content": request},
            {"role": "assistant", "tool_calls": [call]},
        ],
        "parallel_tool_calls": False,
        "tools": tools,
    }


def drone_records(n: int, tools: list[dict[str, Any]] = DRONE_TOOLS) -> list[dict[str, Any]]:
    """``n`` lines of the cookbook's file, calling only ``tools``."""
    names = {t["function"]["name"] for t in tools}
    requests = [r for r in DRONE_REQUESTS if r[1] in names]
    return [drone_record(*requests[i % len(requests)], tools=tools) for i in range(n)]


WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
MULTI_TURN: dict[str, Any] = {
    "messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather "},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "Sunny, 18 C.", "weight": 0},
        {"role": "user", "content": "And should I take a coat?", "name": "ann"},
        {"role": "assistant", "content": "No coat needed.", "weight": 1},
    ],
    "tools": [WEATHER_TOOL],
}

# Qwen2.5-Instruct's chat template (its tokenizer_config.json), which renders tools and calls.
QWEN25_TEMPLATE = (Path(__file__).parent / "qwen25_chat_template.jinja").read_text()
# ChatML without tools: a template that ignores ``tools=`` (as SmolLM2's does).
PLAIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def with_chat_template(model: Path, dest: Path, template: str) -> Path:
    """A copy of the model folder ``model`` at ``dest`` whose tokenizer has ``template``."""
    from modelio.loading import load_tokenizer

    shutil.copytree(model, dest)
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(dest)
    return dest
