"""A request's prompts as token rows: wrapped in the adapter's prompt format, checked against
the model's context and the operator's limits.

The prompt format is the one the adapter was trained with (``shared.templates``), so that a
DialogSum adapter given a bare dialogue sees exactly the prompt it learned to summarize, and
stops at the format's end marker. ``raw_prompt`` sends the text as is.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from engine import tools
from engine.decoding import BASE, Row
from engine.tools import message_dicts
from modelio.model_text import ModelText
from shared.errors import ContextLengthExceeded, InvalidRequest
from shared.hermes import ToolFormat
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest, Target
from shared.settings import Settings
from shared.templates import PromptFormat, render_prompt, stop_sequences


@dataclass(frozen=True)
class Prompt:
    """One prompt, as text or as token ids, and what ends its completion."""

    text: str | None
    stops: list[str]
    stop_ids: frozenset[int]
    ids: list[int] | None = None


@dataclass(frozen=True)
class Prepared:
    rows: list[Row]
    prompt_tokens: int


_SLOT = "\x1fINPUT\x1f"


def _format(target: Target, req: SamplingRequest) -> PromptFormat | None:
    # A prompt sent for scoring (echo) is scored as given: its tokens and their logprobs
    # come back, and an evaluation reads them by position.
    if req.raw_prompt or target.adapter_path is None or req.echo_prompt:
        return None
    return target.prompt_format


def _wrap_ids(host: ModelText, fmt: PromptFormat, ids: list[int]) -> list[int]:
    """Token ids wrapped in the format: the format's own text before and after, tokenized
    apart, around the ids as sent."""
    before, _, after = render_prompt(fmt, _SLOT, host.render_chat).partition(_SLOT)
    return host.encode(before) + ids + host.encode(after)


def completion_prompts(host: ModelText, target: Target,
                       req: CompletionRequest) -> list[Prompt]:
    """Each prompt wrapped in the adapter's format (unless ``raw_prompt`` or ``echo``)."""
    fmt = _format(target, req)
    user_stops = list(req.stop or [])
    stops = user_stops + (stop_sequences(fmt) if fmt is not None else [])
    ids = host.eos_ids | (host.chat_end_ids() if fmt is not None and fmt.type == "chat"
                          else frozenset())
    prompts = []
    for p in req.prompts:
        if isinstance(p, str):
            text = render_prompt(fmt, p, host.render_chat) if fmt is not None else p
            prompts.append(Prompt(text, stops, ids))
        else:
            check_token_ids(host, p)
            prompts.append(Prompt(None, stops, ids,
                                  _wrap_ids(host, fmt, p) if fmt is not None else p))
    return prompts


def check_token_ids(host: ModelText, ids: Iterable[int], param: str = "prompt") -> None:
    """Raises InvalidRequest for a token id outside the model's vocabulary."""
    vocabulary = len(host.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocabulary), None)
    if bad is not None:
        raise InvalidRequest(f"{param}: token id {bad} is not in the model's vocabulary "
                             f"(0-{vocabulary - 1})", param=param)


def chat_prompt(host: ModelText, target: Target, req: ChatCompletionRequest,
                taught: ToolFormat | None = None) -> Prompt:
    """The conversation as one prompt.

    Formats made for one instruction and one input (dolly, phi2-qa, custom) take the last user
    message as the input; the chat format and base models use the tokenizer's chat template,
    which also shows the tools (:mod:`engine.tools`), in ``taught``, the tool format the
    adapter was trained in (``engine.adapters.taught_tool_format``), where it has one.

    Raises:
        InvalidRequest: no user message for a one-turn format, tools for one.
    """
    try:
        messages = message_dicts(req.messages)
    except ValueError as e:
        raise InvalidRequest(str(e), param="messages") from e
    fmt = _format(target, req)
    user_stops = list(req.stop or [])
    users = [m["content"] for m in messages if m["role"] == "user"]
    if fmt is not None and (fmt.type != "chat" or (fmt.instruction and len(messages) == 1)):
        if req.calls_tools:
            raise InvalidRequest(f"'tools' needs a chat model: this one was trained with the "
                                 f"one-turn {fmt.type} prompt format", param="tools")
        if not users:
            raise InvalidRequest("messages: no message with role 'user'", param="messages")
        text = render_prompt(fmt, users[-1], host.render_chat)
    elif req.calls_tools:
        text = tools.render(host, req, taught)
    else:
        text = host.render_chat(messages, True, tool_format=taught)
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
    check_token_ids(host, req.logit_bias or {}, "logit_bias")
    context = host.context_length
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    rows: list[Row] = []
    total = 0
    for prompt in prompts:
        ids = prompt.ids if prompt.ids is not None else host.encode(prompt.text or "")
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
        budget = limit if limit is not None else min(settings.default_max_tokens,
                                                     context - len(ids))
        total += len(ids)
        for _ in range(req.choices):
            rows.append(Row(
                prompt_ids=ids, max_new_tokens=budget, adapter=adapter_name or BASE,
                stops=prompt.stops, stop_ids=prompt.stop_ids,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=(seed + len(rows)) % 2**63, index=len(rows),
                logprobs=req.top_logprobs_count, echo=req.echo_prompt,
                prompt_text=(prompt.text if prompt.text is not None
                             else host.tokenizer.decode(ids)) if req.echo_prompt else "",
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=dict(req.logit_bias or {}),
            ))
    return Prepared(rows, total)
