"""Prompt formats pinned to exact strings: training and inference must agree to the byte."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.records import DEFAULT_INSTRUCTION, Example, to_example
from shared.templates import (
    INTRO_BLURB,
    PromptFormat,
    render,
    render_prompt,
    stop_sequences,
    template_fields,
)

DIALOGUE = "#Person1#: Hi, how are you?\n#Person2#: Fine, thanks. And you?"
SUMMARY = "#Person1# and #Person2# greet each other."
RECORD = {"id": "train_0", "dialogue": DIALOGUE, "summary": SUMMARY, "topic": "greeting"}


@pytest.fixture
def example() -> Example:
    return to_example(RECORD)


def test_intro_blurb_is_the_recipes_wording() -> None:
    assert INTRO_BLURB == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )


def test_dolly_renders_the_recipes_blocks(example: Example) -> None:
    rendered = render(PromptFormat(type="dolly"), example)

    assert rendered.text == "\n\n".join([
        INTRO_BLURB,
        "### Instruct: Summarize the below conversation.",
        DIALOGUE,
        "### Output:",
        SUMMARY,
        "### End",
    ])
    # The split point is right after the response key: the prompt is what inference sends.
    assert rendered.prompt == (
        f"{INTRO_BLURB}\n\n### Instruct: Summarize the below conversation.\n\n{DIALOGUE}"
        "\n\n### Output:\n\n"
    )
    assert rendered.response == f"{SUMMARY}\n\n### End"


def test_dolly_without_context_has_no_empty_block() -> None:
    example = to_example({"instruction": "Name a colour.", "response": "Blue."})

    assert render(PromptFormat(type="dolly"), example).text == (
        f"{INTRO_BLURB}\n\n### Instruct: Name a colour.\n\n### Output:\n\nBlue.\n\n### End"
    )


def test_phi2_qa_format(example: Example) -> None:
    rendered = render(PromptFormat(type="phi2-qa"), example)

    assert rendered.prompt == f"Instruct: Summarize the below conversation.\n{DIALOGUE}\nOutput:"
    assert rendered.response == f" {SUMMARY}"
    assert rendered.text == (
        f"Instruct: Summarize the below conversation.\n{DIALOGUE}\nOutput: {SUMMARY}"
    )


def test_chat_format_uses_the_tokenizers_chat_template(
    example: Example, tiny_tokenizer: Any
) -> None:
    from worker.preprocess import chat_renderer

    rendered = render(PromptFormat(type="chat"), example, chat_renderer(tiny_tokenizer))

    assert rendered.prompt == (
        f"<|im_start|>user\nSummarize the below conversation.\n\n{DIALOGUE}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert rendered.response == f"{SUMMARY}<|im_end|>\n"


def test_chat_records_keep_their_messages(tiny_tokenizer: Any) -> None:
    from worker.preprocess import chat_renderer

    example = to_example({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]})
    rendered = render(PromptFormat(type="chat"), example, chat_renderer(tiny_tokenizer))

    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert rendered.response == "Hello.<|im_end|>\n"


def test_chat_without_a_renderer_is_refused(example: Example) -> None:
    with pytest.raises(ValueError, match="chat template"):
        render(PromptFormat(type="chat"), example)


def test_custom_template_fills_named_fields(example: Example) -> None:
    fmt = PromptFormat(
        type="custom",
        prompt_template="Topic: {topic}\nDialogue:\n{dialogue}\nSummary:",
        response_template=" {summary}",
        end="</s>",
    )
    rendered = render(fmt, example)

    assert rendered.prompt == f"Topic: greeting\nDialogue:\n{DIALOGUE}\nSummary:"
    assert rendered.response == f" {SUMMARY}</s>"
    assert stop_sequences(fmt) == ["</s>"]


def test_custom_template_names_a_missing_field(example: Example) -> None:
    fmt = PromptFormat(type="custom", prompt_template="{speaker}: {dialogue}",
                       response_template="{summary}")

    with pytest.raises(ValueError, match="speaker"):
        render(fmt, example)


@pytest.mark.parametrize("placeholder", [
    "{x.__class__}", "{x.__init__.__globals__}", "{x[0]}", "{0}", "{}", "{x!r}", "{x:>10}",
])
def test_template_field_injection_is_rejected(placeholder: str) -> None:
    with pytest.raises(ValueError, match="plain field name"):
        template_fields(f"Dialogue: {placeholder}")
    with pytest.raises(ValidationError, match="plain field name"):
        PromptFormat(type="custom", prompt_template=f"Dialogue: {placeholder}",
                     response_template="{summary}")


def test_custom_needs_both_templates() -> None:
    with pytest.raises(ValidationError, match="prompt_template and response_template"):
        PromptFormat(type="custom", prompt_template="{dialogue}")


def test_templates_belong_to_custom_only() -> None:
    with pytest.raises(ValidationError, match="custom"):
        PromptFormat(type="dolly", prompt_template="{dialogue}")


def test_parse_accepts_names_and_objects() -> None:
    assert PromptFormat.parse("phi2-qa") == PromptFormat(type="phi2-qa")
    assert PromptFormat.parse(None) == PromptFormat(type="dolly")
    assert PromptFormat.parse({"type": "dolly", "instruction": "Do it."}).instruction == "Do it."


@pytest.mark.parametrize("name", ["dolly", "phi2-qa"])
def test_inference_prompt_equals_the_training_prompt(name: str, example: Example) -> None:
    fmt = PromptFormat(type=name, instruction=DEFAULT_INSTRUCTION)

    assert render_prompt(fmt, DIALOGUE) == render(fmt, example).prompt


def test_inference_prompt_for_chat(example: Example, tiny_tokenizer: Any) -> None:
    from worker.preprocess import chat_renderer

    fmt = PromptFormat(type="chat", instruction=DEFAULT_INSTRUCTION)
    renderer = chat_renderer(tiny_tokenizer)

    assert render_prompt(fmt, DIALOGUE, renderer) == render(fmt, example, renderer).prompt


def test_stop_sequences() -> None:
    assert stop_sequences(PromptFormat(type="dolly")) == ["### End"]
    assert stop_sequences(PromptFormat(type="phi2-qa")) == ["\nInstruct:"]
    assert stop_sequences(PromptFormat(type="chat")) == []
