"""The Hermes text format of tools: chats with tools as plain messages, and replies read back
into OpenAI's ``tool_calls``."""

from __future__ import annotations

import itertools
import json

from shared.chat import check_chat
from shared.hermes import TOOLS_INTRO, TOOLS_OUTRO, hermes_messages, parse_tool_calls
from tests.support.openai_chats import MULTI_TURN, WEATHER_TOOL


def test_a_chat_with_tools_becomes_plain_messages() -> None:
    chat = check_chat(MULTI_TURN)

    plain = hermes_messages(chat.messages, chat.tools)

    spec = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert plain == [
        {"role": "system", "content": f"Answer briefly.\n\n{TOOLS_INTRO}\n{spec}{TOOLS_OUTRO}"},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant",
         "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                    "</tool_call>"},
        {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"},
        {"role": "assistant", "content": "Sunny, 18 C."},
        {"role": "user", "content": "And should I take a coat?"},
        {"role": "assistant", "content": "No coat needed."},
    ]
    assert "</tools>\n\nFor each function call, return a json object" in TOOLS_OUTRO


def test_answers_to_one_turns_calls_share_a_user_message() -> None:
    calls = [{"id": f"c{i}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city})}}
        for i, city in enumerate(["Oslo", "Rome"])]
    messages = [
        {"role": "user", "content": "Oslo and Rome?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "3 C"},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "assistant", "content": "Cold, warm."},
    ]

    plain = hermes_messages(check_chat({"messages": messages}).messages)

    assert plain[0] == {"role": "user", "content": "Oslo and Rome?"}  # no tools: no system
    assert plain[1]["content"] == (
        'Looking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call>")
    assert plain[2] == {"role": "user", "content": "<tool_response>\n3 C\n</tool_response>\n"
                                                   "<tool_response>\n21 C\n</tool_response>"}
    assert len(plain) == 4


def test_a_chat_without_tools_is_its_roles_and_contents() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U", "name": "x"},
                {"role": "assistant", "content": "A"}]

    assert hermes_messages(messages) == [{"role": "system", "content": "S"},
                                         {"role": "user", "content": "U"},
                                         {"role": "assistant", "content": "A"}]


def test_a_rendered_call_parses_back_to_the_same_call() -> None:
    chat = check_chat(MULTI_TURN)
    text = hermes_messages(chat.messages, chat.tools)[2]["content"]
    ids = (f"call_{i}" for i in itertools.count(1))

    parsed = parse_tool_calls(text, new_id=lambda: next(ids))

    assert parsed.content is None
    assert parsed.tool_calls == chat.messages[2]["tool_calls"]


def test_content_before_calls_and_non_ascii_arguments() -> None:
    parsed = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", '
                              '"arguments": {"city": "Zürich"}}\n</tool_call>')

    assert parsed.content == "Let me check."
    [call] = parsed.tool_calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Zürich"}'}


def test_a_block_cut_short_by_the_end_of_generation_is_read() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "reject_request", "arguments": {}}')

    assert [c["function"] for c in parsed.tool_calls] == [{"name": "reject_request",
                                                           "arguments": "{}"}]


def test_malformed_calls_leave_the_reply_as_content() -> None:
    for text in ['<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
                 '<tool_call>\n["get_weather"]\n</tool_call>',
                 '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
                 '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>',
                 "no calls here"]:
        parsed = parse_tool_calls(text)

        assert (parsed.content, parsed.tool_calls) == (text, []), text
