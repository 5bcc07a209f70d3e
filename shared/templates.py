"""Prompt formats, declared once: training renders examples with them, inference wraps prompts.

Each format turns an :class:`~shared.records.Example` into a *prompt* (what the model is given)
and a *response* (what it learns to write, ending in the format's end marker). The training text
is ``prompt + response``; inference sends ``prompt`` and stops at :func:`stop_sequences`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.chat import Chat
from shared.records import Example

INTRO_BLURB = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruct:"
RESPONSE_KEY = "### Output:"
END_KEY = "### End"
DOLLY_SEPARATOR = "\n\n"

FormatName = Literal["dolly", "phi2-qa", "chat", "custom"]
FORMAT_NAMES: tuple[str, ...] = ("dolly", "phi2-qa", "chat", "custom")


class ChatRenderer(Protocol):
    """Renders normalised OpenAI messages (``shared.chat``) and tools as text with a chat
    template: ``modelio.chat_template.chat_renderer`` (the worker) or
    ``ModelText.render_chat`` (the engines); the API never needs one."""

    def __call__(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                 tools: list[dict[str, Any]] | None = None) -> str: ...


class PromptFormat(BaseModel):
    """How records become text. Stored with every adapter so serving uses the same format."""

    model_config = ConfigDict(extra="forbid")

    type: FormatName = Field("dolly", description="dolly | phi2-qa | chat | custom")
    instruction: str | None = Field(
        None,
        max_length=4000,
        description="Instruction for records that carry none (DialogSum: 'Summarize the below "
        "conversation.').",
    )
    prompt_template: str | None = Field(
        None, max_length=20000, description="custom only: the prompt, with {field} placeholders."
    )
    response_template: str | None = Field(
        None, max_length=20000, description="custom only: the response, with {field} placeholders."
    )
    end: str | None = Field(None, max_length=200, description="custom only: end marker.")

    @model_validator(mode="after")
    def _check_custom(self) -> PromptFormat:
        if self.type == "custom":
            if not self.prompt_template or not self.response_template:
                raise ValueError("custom format needs prompt_template and response_template")
            for tmpl in (self.prompt_template, self.response_template):
                template_fields(tmpl)
        elif self.prompt_template or self.response_template or self.end:
            raise ValueError("prompt_template/response_template/end apply to type 'custom' only")
        return self

    @classmethod
    def parse(cls, value: str | dict | PromptFormat | None) -> PromptFormat:
        """Accept a bare name (``"dolly"``) or a full object."""
        if value is None:
            return cls()
        if isinstance(value, PromptFormat):
            return value
        if isinstance(value, str):
            return cls(type=value)  # type: ignore[arg-type]
        return cls.model_validate(value)


def template_fields(template: str) -> list[str]:
    """The named fields of a custom template. Only plain names are allowed: no attribute or
    index access (``{x.__class__}``), no positional fields, no format specs."""
    names = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template placeholder '{{{name}}}' must be a plain field name")
        names.append(name)
    return names


Piece = tuple[str, bool]  # a stretch of a training text, and whether it is learned


@dataclass(frozen=True)
class Rendered:
    """One example as text: ``prompt`` (what inference sends) and ``response`` (what the model
    writes after it, the last assistant message of a chat).

    A chat that learns more than its last message has ``pieces``: the whole text cut at the
    boundaries of the learned messages, in order, each with whether it is learned; their
    concatenation is ``text``. Without pieces, the prompt is not learned and the response is.
    """

    prompt: str
    response: str
    pieces: tuple[Piece, ...] = ()

    @property
    def text(self) -> str:
        return self.prompt + self.response

    def segments(self) -> tuple[Piece, ...]:
        """The text as ``(piece, learned)`` pairs; a piece is tokenized on its own."""
        return self.pieces or ((self.prompt, False), (self.response, True))


def _query(example: Example, fmt: PromptFormat) -> tuple[str, str | None]:
    instruction = example.instruction or fmt.instruction
    if instruction is None:
        # prompt/completion records: the prompt is the instruction itself
        return example.input or "", None
    return instruction, example.input


def render(
    fmt: PromptFormat, example: Example, chat_renderer: ChatRenderer | None = None
) -> Rendered:
    """Render one example.

    Raises:
        ValueError: a custom template names a field the record lacks, or ``chat`` without a
            renderer.
    """
    if fmt.type == "dolly":
        instruction, context = _query(example, fmt)
        blocks = [INTRO_BLURB, f"{INSTRUCTION_KEY} {instruction}"]
        if context:
            blocks.append(context)
        blocks.append(RESPONSE_KEY)
        prompt = DOLLY_SEPARATOR.join(blocks) + DOLLY_SEPARATOR
        return Rendered(prompt, example.output + DOLLY_SEPARATOR + END_KEY)
    if fmt.type == "phi2-qa":
        instruction, context = _query(example, fmt)
        question = f"{instruction}\n{context}" if context else instruction
        return Rendered(f"Instruct: {question}\nOutput:", f" {example.output}")
    if fmt.type == "chat":
        if chat_renderer is None:
            raise ValueError("the chat format needs the tokenizer's chat template")
        if example.chat is not None:
            return render_chat(example.chat, chat_renderer)
        messages = example.messages or _as_messages(example, fmt)
        return render_reply(chat_renderer, messages[:-1], messages[-1])
    # custom
    assert fmt.prompt_template is not None and fmt.response_template is not None
    values = {**example.fields, "instruction": example.instruction or fmt.instruction or ""}
    values.setdefault("input", example.input or "")
    values.setdefault("output", example.output)
    try:
        prompt = fmt.prompt_template.format_map(values)
        response = fmt.response_template.format_map(values)
    except KeyError as e:
        raise ValueError(f"template field {e} is not a column of the record") from e
    return Rendered(prompt, response + (fmt.end or ""))


def render_reply(chat_renderer: ChatRenderer, messages: list[dict[str, Any]],
                 reply: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> Rendered:
    """One assistant message after a conversation, as training renders it: the prompt is the
    conversation with the template's generation prompt (what inference sends), the response
    the text the template adds for ``reply`` (its tool calls and end-of-turn marker
    included).

    Args:
        messages: normalised messages before the reply (``shared.chat.check_messages``).
        reply: one normalised assistant message (``shared.chat.check_reply``).
        tools: the function specs the conversation declares.

    Raises:
        ValueError: the template renders the conversation differently once the reply is
            added (its text does not start with the prompt's).
    """
    prompt = chat_renderer(messages, True, tools=tools)
    full = chat_renderer([*messages, reply], False, tools=tools)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not extend the prompt")
    return Rendered(prompt, full[len(prompt):])


def render_chat(chat: Chat, chat_renderer: ChatRenderer) -> Rendered:
    """A chat record for training: every learned assistant message (weight not 0, tool calls
    included) is learned, everything else is context.

    Each learned message is cut out as :func:`render_reply` cuts a reply: the text the
    template adds for it after the conversation before it. The conversation up to a message
    must render as the start of the conversation up to a later one.

    Raises:
        ValueError: the template renders an earlier turn differently once more follow.
    """
    pieces: list[Piece] = []
    done = ""  # the text of the messages cut so far
    last = len(chat.messages) - 1
    for k in sorted({*chat.learned, last}):
        turn = render_reply(chat_renderer, chat.messages[:k], chat.messages[k], chat.tools)
        if not turn.prompt.startswith(done):
            raise ValueError(f"the tokenizer's chat template renders messages[:{k}] "
                             "differently once more messages follow, so the turns to learn "
                             "cannot be cut out of the conversation")
        pieces += [(turn.prompt[len(done):], False), (turn.response, k in chat.learned)]
        done = turn.text
    if chat.learned == (last,):
        return turn
    return Rendered(turn.prompt, turn.response, tuple(_merge(pieces)))


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind as one (context pieces in a row are tokenized as
    one text, as a prompt is)."""
    out: list[Piece] = []
    for text, learned in pieces:
        if out and out[-1][1] == learned:
            out[-1] = (out[-1][0] + text, learned)
        elif text or learned:
            out.append((text, learned))
    return out


def _as_messages(example: Example, fmt: PromptFormat) -> list[dict[str, str]]:
    instruction, context = _query(example, fmt)
    user = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def render_prompt(
    fmt: PromptFormat, user_text: str, chat_renderer: ChatRenderer | None = None
) -> str:
    """Wrap a user's input for inference: for a DialogSum adapter, ``user_text`` is the
    dialogue and the result is the prompt the adapter was trained on."""
    if fmt.type == "chat":
        if chat_renderer is None:
            raise ValueError("the chat format needs the tokenizer's chat template")
        return chat_renderer(_as_messages(Example(None, user_text, ""), fmt)[:-1], True)
    if fmt.type == "custom":
        assert fmt.prompt_template is not None
        names = template_fields(fmt.prompt_template)
        return fmt.prompt_template.format_map(dict.fromkeys(names, user_text))
    return render(fmt, Example(None, user_text, "")).prompt


def stop_sequences(fmt: PromptFormat) -> list[str]:
    """Text that ends a response in this format (EOS always ends one too)."""
    if fmt.type == "dolly":
        return [END_KEY]
    if fmt.type == "phi2-qa":
        return ["\nInstruct:"]
    if fmt.type == "custom" and fmt.end:
        return [fmt.end]
    return []
