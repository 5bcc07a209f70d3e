"""How the engine shows tools to a model: in the tool format the adapter was trained in.

An adapter fine-tuned on chats with tools over a chat template that renders none learned the
Hermes format (``shared.hermes``); its ``lorafleet.json`` says so, and the engine renders a
request with tools exactly as training rendered the chats, so that the prompt is the start of
what the adapter learned. A base model whose template renders no tools is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import tools
from engine.adapters import adapter_ref, taught_tool_format
from engine.prompts import chat_prompt
from modelio import chat_template
from modelio.model_text import ModelText
from shared.chat import check_chat
from shared.hermes import TOOLS_INTRO
from shared.inference import ChatCompletionRequest, Target
from shared.request_fields import UnsupportedParameter
from shared.templates import PromptFormat
from tests.support.openai_chats import PLAIN_CHATML, with_chat_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# One training record in OpenAI's function-calling shape: a call, its answer, a reply.
RECORD = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 3}"},
    {"role": "assistant", "content": "It is 3 degrees in Oslo."}]}


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelText:
    """A model whose chat template renders no tools (as SmolLM2's)."""
    folder = with_chat_template(tiny_model, tmp_path_factory.mktemp("plain") / "model",
                                PLAIN_CHATML)
    return ModelText(str(folder))


def adapter(folder: Path, meta: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "lorafleet.json").write_text(json.dumps(meta))
    return folder


def request(upto: int, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "ft:tiny:t:ftjob-1", "messages": RECORD["messages"][:upto], "tools": [WEATHER],
         **fields})


def fine_tuned(base: ModelText) -> Target:
    return Target(model="ft:tiny:t:ftjob-1", base_model=base.name, adapter_path="/adapter",
                  prompt_format=PromptFormat(type="chat"))


def test_the_stored_tool_format_is_read_per_adapter_version(tmp_path: Path) -> None:
    hermes = adapter_ref(adapter(tmp_path / "a", {"tool_format": "hermes"}))
    untaught = adapter_ref(adapter(tmp_path / "b", {"prompt_format": {"type": "chat"}}))
    odd = adapter_ref(adapter(tmp_path / "c", {"tool_format": "xml"}))

    assert taught_tool_format(hermes) == "hermes"
    assert taught_tool_format(untaught) is None
    assert taught_tool_format(odd) is None
    assert taught_tool_format(None) is None
    # A new adapter saved in the same folder is read again.
    renewed = adapter_ref(adapter(tmp_path / "b", {"tool_format": "template"}))
    assert renewed.name != untaught.name
    assert taught_tool_format(renewed) == "template"


@pytest.mark.parametrize("upto", [2, 4])
def test_a_hermes_adapter_is_asked_as_it_was_trained(plain: ModelText, upto: int) -> None:
    chat = check_chat(RECORD)
    trained = chat_template.render_chat(plain.tokenizer, chat.messages, False, chat.tools,
                                        tool_format="hermes")

    prompt = chat_prompt(plain, fine_tuned(plain), request(upto), "hermes")

    assert prompt.text is not None
    assert TOOLS_INTRO in prompt.text and "get_weather" in prompt.text
    # The request's prompt is where the adapter learned to answer it.
    assert trained.startswith(prompt.text), (prompt.text, trained)
    if upto == 4:  # the call and its answer, in the history, as training wrote them
        assert "<tool_call>" in prompt.text and "<tool_response>" in prompt.text


def test_a_forced_call_opens_the_call_for_the_grammar(plain: ModelText) -> None:
    prompt = chat_prompt(plain, fine_tuned(plain), request(2, tool_choice="required"), "hermes")

    assert prompt.text is not None and prompt.text.endswith("<tool_call>\n")
    reply = tools.parse_reply('{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                              "</tool_call>", request(2, tool_choice="required"))
    assert reply[0] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in reply[1]] == [("get_weather", {"city": "Oslo"})]


def test_a_model_never_taught_tools_is_refused_naming_tools(plain: ModelText) -> None:
    base = Target(model=plain.name, base_model=plain.name)

    with pytest.raises(UnsupportedParameter) as refused:
        chat_prompt(plain, base, request(2))
    with pytest.raises(UnsupportedParameter):  # an adapter trained on chats without tools
        chat_prompt(plain, fine_tuned(plain), request(2))

    assert refused.value.param == "tools"
    assert "does not render tools" in str(refused.value)


def test_a_template_that_renders_tools_renders_them(tiny_model: Path) -> None:
    text = ModelText(str(tiny_model))
    chat = check_chat(RECORD)

    prompt = chat_prompt(text, Target(model=text.name, base_model=text.name), request(2))

    assert text.tool_format() == "template"
    assert prompt.text == chat_template.render_chat(text.tokenizer, chat.messages[:2], True,
                                                    chat.tools, tool_format="template")
    assert TOOLS_INTRO not in prompt.text
