"""Chat records in OpenAI's whole shape: what is accepted, how it is normalised, and each bad
input refused naming the path of the bad value."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from shared.chat import (
    RecordError,
    call_ids,
    check_chat,
    check_messages,
    check_reply,
    check_tools,
)
from tests.support.openai_chats import DRONE_TOOLS, MULTI_TURN, WEATHER_TOOL, drone_record


def test_the_cookbooks_function_calling_record() -> None:
    chat = check_chat(drone_record("Turn on the lights.", "set_drone_lighting", {"mode": "on"}))

    assert chat.tools == DRONE_TOOLS
    assert chat.parallel_tool_calls is False
    assert chat.learned == (2,)
    assert chat.messages[2] == {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_id", "type": "function",
        "function": {"name": "set_drone_lighting", "arguments": '{"mode": "on"}'}}]}
    assert chat.uses_tools and not chat.single_turn


def test_a_multi_turn_chat_is_normalised() -> None:
    chat = check_chat(MULTI_TURN)

    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool",
                                                  "assistant", "user", "assistant"]
    assert chat.messages[0] == {"role": "system", "content": "Answer briefly."}
    assert chat.messages[1]["content"] == "What is the weather in Paris?"
    assert chat.messages[3] == {"role": "tool", "content": "18 C, sunny",
                                "tool_call_id": "call_1"}
    assert chat.messages[5] == {"role": "user", "content": "And should I take a coat?",
                                "name": "ann"}
    assert all("weight" not in m for m in chat.messages)
    assert chat.learned == (2, 6)  # weight 0 on messages[4]; no weight is weight 1
    assert chat.tools == [WEATHER_TOOL] and chat.parallel_tool_calls is None


def test_a_plain_chat_is_single_turn() -> None:
    chat = check_chat({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]})

    assert chat.single_turn and not chat.uses_tools
    assert chat.messages == [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]


def broken(path: list[Any], value: Any, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """``record`` (default :data:`MULTI_TURN`) with the value at ``path`` replaced (or removed,
    for ``...``)."""
    out = copy.deepcopy(record if record is not None else MULTI_TURN)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


CALL = ["messages", 2, "tool_calls", 0]


@pytest.mark.parametrize(("record", "says"), [
    (broken(["messages", 1, "role"], "robot"),
     "messages[1].role must be one of system, developer, user, assistant, tool"),
    (broken(["messages", 1, "role"], "function"), "messages[1].role must be one of"),
    (broken([*CALL, "function", "arguments"], "{city: Paris}"),
     "messages[2].tool_calls[0].function.arguments is not valid JSON"),
    (broken([*CALL, "function", "arguments"], '["Paris"]'),
     "messages[2].tool_calls[0].function.arguments must be a JSON object"),
    (broken([*CALL, "function", "arguments"], {"city": "Paris"}),
     "messages[2].tool_calls[0].function.arguments must be a string (of JSON)"),
    (broken([*CALL, "function", "name"], "get weather"),
     "messages[2].tool_calls[0].function.name must match"),
    (broken([*CALL, "function", "name"], "get_time"),
     "messages[2].tool_calls[0].function.name 'get_time' is not one of the tools (get_weather)"),
    (broken([*CALL, "id"], ""), "messages[2].tool_calls[0].id must be a non-empty string"),
    (broken([*CALL, "type"], "code"), "messages[2].tool_calls[0].type must be 'function'"),
    (broken(["messages", 2, "tool_calls"], []),
     "messages[2].tool_calls must be a non-empty list"),
    (broken(["messages", 2, "tool_calls"], ...),
     "messages[2] has neither content nor tool_calls"),
    (broken(["messages", 3, "tool_call_id"], "call_9"),
     "messages[3].tool_call_id 'call_9' matches no earlier tool call"),
    (broken(["messages", 3, "tool_call_id"], ...),
     "messages[3].tool_call_id must be the id of an earlier tool call"),
    (broken(["messages", 4, "weight"], 0.5), "messages[4].weight must be 0 or 1"),
    (broken(["messages", 4, "weight"], True), "messages[4].weight must be 0 or 1"),
    (broken(["messages", 4, "weight"], 2), "messages[4].weight must be 0 or 1"),
    (broken(["messages", 5, "weight"], 0), "messages[5].weight applies to assistant messages"),
    (broken(["messages", 6, "weight"], 0, broken(["messages", 2, "weight"], 0)),
     "messages: no assistant message is learned (each has weight 0)"),
    (broken(["messages", 6, "content"], None), "messages[6] has neither content nor tool_calls"),
    (broken(["messages", 1, "content"], [{"type": "image_url", "image_url": {"url": "x"}}]),
     "messages[1].content[0].type must be 'text'"),
    (broken(["messages", 1, "content"], [{"type": "text", "text": 3}]),
     "messages[1].content[0].text must be a string"),
    (broken(["messages", 1, "content"], 7),
     "messages[1].content must be a string or a list of text parts"),
    (broken(["messages", 1, "content"], ...),
     "messages[1].content must be a string or a list of text parts"),
    (broken(["messages", 5, "name"], ""), "messages[5].name must be a string of 1 to 64"),
    (broken(["messages", 1, "tool_calls"], MULTI_TURN["messages"][2]["tool_calls"]),
     "messages[1].tool_calls is allowed on assistant messages only"),
    (broken(["messages", 2, "function_call"], {"name": "get_weather"}),
     "messages[2].function_call is OpenAI's deprecated form; use tool_calls"),
    (broken(["tools", 0, "type"], "retrieval"), "tools[0].type must be 'function'"),
    (broken(["tools"], {"get_weather": {}}), "tools must be a list of function specs"),
    (broken(["tools"], [WEATHER_TOOL, WEATHER_TOOL]),
     "tools[1].function.name 'get_weather' is declared twice"),
    (broken(["tools", 0, "function", "parameters"], "city"),
     "tools[0].function.parameters must be a JSON schema object"),
    (broken(["parallel_tool_calls"], "no"), "parallel_tool_calls must be true or false"),
    (broken(["messages", 2, "tool_calls"], MULTI_TURN["messages"][2]["tool_calls"] * 2),
     "messages[2].tool_calls[1].id 'call_1' is the id of an earlier call"),
    (broken(["messages"], MULTI_TURN["messages"][:4]),
     "the last message must have role 'assistant'"),
    (broken(["messages"], []), "'messages' must be a non-empty list"),
])
def test_bad_chats_are_named_by_path(record: dict[str, Any], says: str) -> None:
    with pytest.raises(RecordError) as exc:
        check_chat(record)

    assert str(exc.value).startswith(says), str(exc.value)


def test_parallel_calls_need_parallel_tool_calls() -> None:
    two = [{"id": f"c{i}", "type": "function",
            "function": {"name": "takeoff_drone", "arguments": "{}"}} for i in range(2)]
    record = broken(["messages", 2, "tool_calls"], two, drone_record("Up.", "takeoff_drone", {}))

    with pytest.raises(RecordError, match=r"^messages\[2\]\.tool_calls has 2 calls, but "
                                          "parallel_tool_calls is false"):
        check_chat(record)
    assert len(check_chat({**record, "parallel_tool_calls": True}).messages[2]["tool_calls"]) == 2


def test_calls_without_tools_are_taken_as_they_are() -> None:
    record = {k: v for k, v in MULTI_TURN.items() if k != "tools"}

    assert check_chat(record).tools is None


# --------------------------------------------------------------------------- for preference data
def test_check_messages_names_its_path() -> None:
    messages = copy.deepcopy(MULTI_TURN["messages"][:4])
    messages[2]["tool_calls"][0]["function"]["arguments"] = "{"

    with pytest.raises(RecordError, match=r"^input\.messages\[2\]\.tool_calls\[0\]\.function"
                                          r"\.arguments is not valid JSON$"):
        check_messages(messages, path="input.messages")
    assert check_messages(MULTI_TURN["messages"][:4], path="input.messages")[3]["role"] == "tool"


def test_check_reply_takes_one_assistant_message() -> None:
    prompt = check_messages(MULTI_TURN["messages"][:4])
    reply = check_reply([{"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}],
                        path="preferred_output", call_ids=call_ids(prompt))

    assert reply == {"role": "assistant", "content": "Sunny."}
    assert call_ids(prompt) == {"call_1"}
    for output, says in [
        ([], "preferred_output must be a list of one assistant message"),
        ([{"role": "user", "content": "x"}], r"preferred_output\[0\]\.role must be 'assistant'"),
        ([{"role": "assistant", "content": 5}], r"preferred_output\[0\]\.content must be a "
                                                "string or a list of text parts"),
        ([{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}],
         r"preferred_output\[0\]\.tool_calls\[0\]\.id 'call_1' is the id of an earlier call"),
    ]:
        with pytest.raises(RecordError, match=f"^{says}"):
            check_reply(output, path="preferred_output", call_ids=call_ids(prompt))


def test_check_tools_returns_the_specs_unchanged() -> None:
    assert check_tools(DRONE_TOOLS) is DRONE_TOOLS
    with pytest.raises(RecordError, match=r"^input\.tools\[0\]\.function must be an object"):
        check_tools([{"type": "function"}], path="input.tools")


def test_arguments_keep_the_users_json_text() -> None:
    text = '{"city":"Paris" , "units":"C"}'
    chat = check_chat(broken([*CALL, "function", "arguments"], text))

    assert chat.messages[2]["tool_calls"][0]["function"]["arguments"] == text
    assert json.loads(text) == {"city": "Paris", "units": "C"}
