"""Chat templates and tools: the probe that picks the tool format, rendering in either format,
and inference rendering a request exactly as training rendered the chat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from modelio.chat_template import chat_renderer, probe_tool_format, render_chat  # noqa: E402
from modelio.loading import load_tokenizer  # noqa: E402
from modelio.model_text import ModelText  # noqa: E402
from shared.chat import check_chat  # noqa: E402
from shared.errors import LorafleetError  # noqa: E402
from shared.hermes import parse_tool_calls  # noqa: E402
from shared.records import to_example  # noqa: E402
from shared.templates import PromptFormat, render, render_reply  # noqa: E402
from tests.support.openai_chats import (  # noqa: E402
    MULTI_TURN,
    PLAIN_CHATML,
    QWEN25_TEMPLATE,
    drone_record,
    with_chat_template,
)

# Llama 3.1's way to refuse what it cannot render.
REFUSING = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
            "{{ raise_exception('tool messages are not supported') }}{% endif %}"
            "{{ m['role'] + ': ' + (m['content'] or '') + '\\n' }}{% endfor %}")


@pytest.fixture(scope="module")
def qwen_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder with Qwen2.5's chat template, which renders tools."""
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("qwen") / "model",
                              QWEN25_TEMPLATE)


@pytest.fixture(scope="module")
def plain_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder with a ChatML template that renders no tools."""
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("plain") / "model",
                              PLAIN_CHATML)


def with_template(tiny_model: Path, template: str | None) -> Any:
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = template
    return tokenizer


def test_the_probe_reads_what_the_template_renders(tiny_model: Path, tiny_tokenizer: Any,
                                                   qwen_model: Path, plain_model: Path) -> None:
    assert probe_tool_format(load_tokenizer(str(plain_model))) == "hermes"  # ignores tools
    assert probe_tool_format(load_tokenizer(str(qwen_model))) == "template"
    assert probe_tool_format(tiny_tokenizer) == "template"  # its ChatML renders tools too
    assert probe_tool_format(with_template(tiny_model, REFUSING)) == "hermes"
    assert probe_tool_format(with_template(tiny_model, None)) == "hermes"


def test_the_template_renders_calls_with_object_arguments(qwen_model: Path) -> None:
    tokenizer = load_tokenizer(str(qwen_model))
    chat = check_chat(drone_record("Lights on.", "set_drone_lighting", {"mode": "on"}))

    text = render_chat(tokenizer, chat.messages, False, chat.tools, tool_format="template")

    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "set_drone_lighting", '
                         '"arguments": {"mode": "on"}}\n</tool_call><|im_end|>\n')
    assert '"name": "reject_request"' in text  # the tools, in the system turn


def test_hermes_matches_qwens_own_rendering(qwen_model: Path) -> None:
    tokenizer = load_tokenizer(str(qwen_model))
    chat = check_chat(MULTI_TURN)

    ours = render_chat(tokenizer, chat.messages, False, chat.tools, tool_format="hermes")
    theirs = render_chat(tokenizer, chat.messages, False, chat.tools, tool_format="template")

    assert ours == theirs


def test_a_chat_without_tools_renders_the_same_in_both_formats(tiny_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]

    texts = {fmt: render_chat(tiny_tokenizer, messages, False, tool_format=fmt)
             for fmt in ("hermes", "template")}

    assert set(texts.values()) == {tiny_tokenizer.apply_chat_template(messages, tokenize=False)}


def test_a_template_that_refuses_names_its_reason(tiny_model: Path) -> None:
    tokenizer = with_template(tiny_model, REFUSING)

    with pytest.raises(ValueError, match="cannot render this chat: tool messages are not"):
        render_chat(tokenizer, check_chat(MULTI_TURN).messages, False, tool_format="template")


@pytest.mark.parametrize("which", ["plain", "qwen"])
def test_inference_renders_a_request_as_training_rendered_the_chat(
        plain_model: Path, qwen_model: Path, which: str) -> None:
    folder = plain_model if which == "plain" else qwen_model
    text = ModelText(str(folder))
    assert text.chat_end_ids()  # its probe renders a chat, which probes the tool format
    tool_format = text.tool_format()
    example = to_example(MULTI_TURN)
    chat = check_chat(MULTI_TURN)

    trained = render(PromptFormat(type="chat"), example,
                     chat_renderer(text.tokenizer, tool_format))
    served = text.render_chat(chat.messages[:-1], True, chat.tools, tool_format=tool_format)

    assert tool_format == ("hermes" if which == "plain" else "template")
    assert served == trained.prompt
    assert text.render_chat(chat.messages[:-1], True, chat.tools) == served  # its own probe
    reply = parse_tool_calls(trained.segments()[1][0].removesuffix("<|im_end|>\n"))
    assert [c["function"] for c in reply.tool_calls] == [
        {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}]


def test_model_text_names_the_messages_it_cannot_render(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    folder = with_chat_template(tiny_model, tmp_path / "model", REFUSING)

    with pytest.raises(LorafleetError) as exc:
        ModelText(str(folder)).render_chat(check_chat(MULTI_TURN).messages, True,
                                           tool_format="template")

    assert exc.value.param == "messages"
    assert "tool messages are not supported" in exc.value.message


def test_one_reply_renders_as_its_turn_in_the_chat(tiny_tokenizer: Any) -> None:
    chat = check_chat(MULTI_TURN)
    renderer = chat_renderer(tiny_tokenizer, "hermes")

    turn = render_reply(renderer, chat.messages[:2], chat.messages[2], chat.tools)

    pieces = render(PromptFormat(type="chat"), to_example(MULTI_TURN), renderer).segments()
    assert (turn.prompt, turn.response) == (pieces[0][0], pieces[1][0])
    assert turn.response.startswith("<tool_call>\n")


@pytest.mark.parametrize("tool_format", ["template", "hermes"])
def test_arguments_may_come_parsed(qwen_model: Path, tool_format: str) -> None:
    text = ModelText(str(qwen_model))
    chat = check_chat(MULTI_TURN)
    parsed = json.loads(json.dumps(chat.messages))
    for message in parsed:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])

    as_objects = text.render_chat(parsed, True, chat.tools, tool_format=tool_format)

    assert as_objects == text.render_chat(chat.messages, True, chat.tools,
                                          tool_format=tool_format)
    assert '"arguments": {"city": "Paris"}' in as_objects
