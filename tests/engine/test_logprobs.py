"""Logprobs, echo, token prompts, penalties and biases on the built-in engine, against what
transformers + peft compute for the same tokens; tools and structured outputs refused by name.
The same on vLLM, through the API, runs in ``test_vllm_requests.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import responses
from shared.inference import EngineChatRequest, EngineCompletionRequest
from shared.request_fields import UnsupportedParameter
from tests.engine.conftest import run
from tests.engine.parity import assert_chat_parity, assert_completion_parity

DIALOGUE = "#Person1#: Hi, how are you today?\n#Person2#: Fine, thanks."
DOLLY = {"type": "dolly", "instruction": "Summarize the below conversation."}


def body(model: Path, adapter: Path | None, chat: bool = False, fmt: Any = None,
         **fields: Any) -> Any:
    target = {"model": "m", "base_model": str(model),
              "adapter_path": str(adapter) if adapter else None, "prompt_format": fmt}
    if chat:
        return EngineChatRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": DIALOGUE}],
             "temperature": 0, "max_tokens": 8, **fields, "target": target})
    return EngineCompletionRequest.model_validate(
        {"model": "m", "prompt": DIALOGUE, "temperature": 0, "max_tokens": 8, **fields,
         "target": target})


def answer(engine: Any, request_body: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        request = await engine.submit(request_body)
        shaper = responses.shaper_for("m", isinstance(request_body, EngineChatRequest),
                                      request.rows, request.host.token_text)
        return await responses.collect(request, shaper)

    return dict(run(go()))


def test_echo_scores_the_prompt_as_peft_does(make_engine: Any, tiny_model: Path,
                                             adapters: list[Path],
                                             reference_logprobs: Any) -> None:
    engine = make_engine()
    ids = engine.host(str(tiny_model)).encode(DIALOGUE)
    # A fine-tuned model whose format wraps prompts: a prompt sent for scoring is scored as
    # given, so its tokens are the client's own.
    result = answer(engine, body(tiny_model, adapters[0], fmt=DOLLY, echo=True, max_tokens=0,
                                 logprobs=3))
    choice = result["choices"][0]
    assert choice["text"] == DIALOGUE and choice["finish_reason"] == "length"
    assert "".join(choice["logprobs"]["tokens"]) == DIALOGUE
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                               "total_tokens": len(ids)}
    assert_completion_parity(choice["logprobs"], ids,
                             lambda i: reference_logprobs(adapters[0], i), k=3)
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_generated_logprobs_follow_the_tokens_generated(make_engine: Any, tiny_model: Path,
                                                        adapters: list[Path], reference: Any,
                                                        reference_logprobs: Any) -> None:
    engine = make_engine()
    host = engine.host(str(tiny_model))
    ids = host.encode(DIALOGUE)
    result = answer(engine, body(tiny_model, adapters[1], echo=True, logprobs=2, raw_prompt=True))
    choice = result["choices"][0]
    generated = reference(adapters[1], ids, 8)
    assert choice["text"] == DIALOGUE + host.tokenizer.decode(generated, skip_special_tokens=True)
    assert_completion_parity(choice["logprobs"], ids + generated,
                             lambda i: reference_logprobs(adapters[1], i), k=2)
    # Greedy: every generated token is the most likely one.
    for value, top in zip(choice["logprobs"]["token_logprobs"][len(ids):],
                          choice["logprobs"]["top_logprobs"][len(ids):], strict=True):
        assert value == max(top.values())


def test_token_prompts_equal_text_prompts(make_engine: Any, tiny_model: Path,
                                          adapters: list[Path]) -> None:
    engine = make_engine()
    ids = engine.host(str(tiny_model)).encode(DIALOGUE)
    text = answer(engine, body(tiny_model, adapters[0], prompt=[DIALOGUE, "Hello"],
                               raw_prompt=True, logprobs=1))
    tokens = answer(engine, body(tiny_model, adapters[0], raw_prompt=True, logprobs=1,
                                 prompt=[ids, engine.host(str(tiny_model)).encode("Hello")]))
    assert [c["text"] for c in tokens["choices"]] == [c["text"] for c in text["choices"]]
    assert tokens["usage"] == text["usage"]
    one = answer(engine, body(tiny_model, adapters[0], prompt=ids, raw_prompt=True))
    assert one["choices"][0]["text"] == text["choices"][0]["text"]


def test_a_token_prompt_is_wrapped_in_the_format_around_its_ids(make_engine: Any,
                                                                tiny_model: Path,
                                                                adapters: list[Path]) -> None:
    engine = make_engine()
    host = engine.host(str(tiny_model))
    wrapped = answer(engine, body(tiny_model, adapters[0], fmt=DOLLY,
                                  prompt=host.encode(DIALOGUE)))
    as_text = answer(engine, body(tiny_model, adapters[0], fmt=DOLLY))
    assert wrapped["usage"]["prompt_tokens"] > len(host.encode(DIALOGUE))
    assert abs(wrapped["usage"]["prompt_tokens"] - as_text["usage"]["prompt_tokens"]) <= 2


def test_logit_bias_and_penalties_change_the_choice(make_engine: Any, tiny_model: Path) -> None:
    engine = make_engine()
    host = engine.host(str(tiny_model))
    plain = answer(engine, body(tiny_model, None, raw_prompt=True, max_tokens=6, logprobs=0))
    first = plain["choices"][0]["logprobs"]["tokens"][0]
    first_id = host.encode(first)[0] if host.encode(first) else None
    banned = answer(engine, body(tiny_model, None, raw_prompt=True, max_tokens=6, logprobs=0,
                                 logit_bias={str(first_id): -100}))
    assert banned["choices"][0]["logprobs"]["tokens"][0] != first
    forced = answer(engine, body(tiny_model, None, raw_prompt=True, max_tokens=3,
                                 logit_bias={"42": 100}, logprobs=0))
    assert [host.encode(t) for t in forced["choices"][0]["logprobs"]["tokens"]] == [[42]] * 3
    # The logprobs stay the model's own: a biased token is not certain.
    assert forced["choices"][0]["logprobs"]["token_logprobs"][0] < -0.01
    penalized = answer(engine, body(tiny_model, None, raw_prompt=True, max_tokens=3,
                                    logit_bias={"42": 100}, frequency_penalty=2.0,
                                    presence_penalty=2.0))
    assert penalized["usage"]["completion_tokens"] == 3


def test_chat_logprobs_in_the_chat_shape(make_engine: Any, tiny_model: Path,
                                         adapters: list[Path], reference: Any,
                                         reference_logprobs: Any) -> None:
    engine = make_engine()
    host = engine.host(str(tiny_model))
    result = answer(engine, body(tiny_model, adapters[2], chat=True, fmt={"type": "chat"},
                                 logprobs=True, top_logprobs=2))
    choice = result["choices"][0]
    prompt_ids = host.encode(host.render_chat([{"role": "user", "content": DIALOGUE}], True))
    reply_ids = reference(adapters[2], prompt_ids, 8)[:len(choice["logprobs"]["content"])]
    assert result["usage"]["prompt_tokens"] == len(prompt_ids)
    assert_chat_parity(choice["logprobs"], prompt_ids, reply_ids,
                       lambda i: reference_logprobs(adapters[2], i), k=2)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format")])
def test_tools_and_structured_outputs_need_vllm(make_engine: Any, tiny_model: Path,
                                                fields: dict[str, Any], param: str) -> None:
    engine = make_engine()
    with pytest.raises(UnsupportedParameter) as refused:
        answer(engine, body(tiny_model, None, chat=True, **fields))
    assert refused.value.param == param and "built-in engine" in refused.value.message
