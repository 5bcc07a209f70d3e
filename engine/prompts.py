"""A request's prompts as token rows: wrapped in the adapter's prompt format, checked against
the model's context and the operator's limits.

The prompt format is the one the adapter was trained with (``shared.templates``), so that a
DialogSum adapter given a bare dialogue sees exactly the prompt it learned to summarize, and
stops at the format's end marker. ``raw_prompt`` sends the text as is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from engine.decoding import BASE, Row
from modelio.model_text import ModelText
from shared.errors import ContextLengthExceeded, InvalidRequest
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest, Target
from shared.settings import Settings
from shared.templates import PromptFormat, render_prompt, stop_sequences


@dataclass(frozen=True)
class Prompt:
    """One prompt as text, and what ends its completion."""

    text: str
    stops: list[str]
    stop_ids: frozenset[int]


@dataclass(frozen=True)
class Prepared:
    rows: list[Row]
    prompt_tokens: int


def _format(target: Target, req: SamplingRequest) -> PromptFormat | None:
    if req.raw_prompt or target.adapter_path is None:
        return None
    return target.prompt_format


def completion_prompts(host: ModelText, target: Target,
                       req: CompletionRequest) -> list[Prompt]:
    """Each prompt wrapped in the adapter's format (unless ``raw_prompt``)."""
    fmt = _format(target, req)
    user_stops = list(req.stop or [])
    if fmt is None:
        return [Prompt(p, user_stops, host.eos_ids) for p in req.prompts]
    ids = host.eos_ids | (host.chat_end_ids() if fmt.type == "chat" else frozenset())
    stops = user_stops + stop_sequences(fmt)
    return [Prompt(render_prompt(fmt, p, host.render_chat), stops, ids) for p in req.prompts]


def chat_prompt(host: ModelText, target: Target, req: ChatCompletionRequest) -> Prompt:
    """The conversation as one prompt.

    Formats made for one instruction and one input (dolly, phi2-qa, custom) take the last user
    message as the input; the chat format and base models use the tokenizer's chat template.
    """
    try:
        messages = [{"role": m.role, "content": m.text} for m in req.messages]
    except ValueError as e:
        raise InvalidRequest(str(e), param="messages") from e
    fmt = _format(target, req)
    user_stops = list(req.stop or [])
    users = [m["content"] for m in messages if m["role"] == "user"]
    if fmt is not None and (fmt.type != "chat" or (fmt.instruction and len(messages) == 1)):
        if not users:
            raise InvalidRequest("messages: no message with role 'user'", param="messages")
        text = render_prompt(fmt, users[-1], host.render_chat)
    else:
        text = host.render_chat(messages, True)
    stops = user_stops + (stop_sequences(fmt) if fmt is not None else [])
    if fmt is None or fmt.type == "chat":
        return Prompt(text, stops, host.eos_ids | host.chat_end_ids())
    return Prompt(text, stops, host.eos_ids)


def make_rows(host: ModelText, adapter_name: str | None, prompts: list[Prompt],
              req: SamplingRequest, settings: Settings, param: str) -> Prepared:
    """Tokenize and check the prompts; one row per prompt and choice.

    Raises:
        InvalidRequest: ``max_tokens`` above the operator's limit, too many choices, or an
            empty prompt.
        ContextLengthExceeded: a prompt (plus ``max_tokens``) longer than the model's context.
    """
    limit = req.limit()
    if limit is not None and limit > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {limit}, above this server's limit of {settings.max_tokens_limit}",
            param="max_tokens")
    if len(prompts) * req.choices > settings.max_batch_size:
        raise InvalidRequest(
            f"{len(prompts)} prompt(s) x n={req.choices} is more than the "
            f"{settings.max_batch_size} sequences this server generates at once", param="n")
    context = host.context_length
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    rows: list[Row] = []
    total = 0
    for prompt in prompts:
        ids = host.encode(prompt.text)
        if not ids:
            bos = host.tokenizer.bos_token_id
            if bos is None:
                raise InvalidRequest("the prompt is empty", param=param)
            ids = [bos]
        if len(ids) >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{len(ids)} tokens. Shorten the prompt.", param=param)
        if limit is not None and len(ids) + limit > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} for "
                "the completion). Reduce the prompt or max_tokens.", param="max_tokens")
        budget = limit or min(settings.default_max_tokens, context - len(ids))
        total += len(ids)
        for _ in range(req.choices):
            rows.append(Row(
                prompt_ids=ids, max_new_tokens=budget, adapter=adapter_name or BASE,
                stops=prompt.stops, stop_ids=prompt.stop_ids,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=(seed + len(rows)) % 2**63, index=len(rows),
            ))
    return Prepared(rows, total)
