"""The engine in-process: mixed-adapter batches against peft references, the adapter cache,
prompt formats and stops, sampling seeds, the queue bound and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine import responses
from shared.errors import ContextLengthExceeded, InvalidRequest, NotFound, Overloaded
from shared.inference import EngineChatRequest, EngineCompletionRequest
from shared.templates import PromptFormat, render_prompt
from tests.engine.conftest import build_adapter, run

PROMPTS = [
    "#Person1#: Hi, how are you today?",
    "Hello",
    "#Person2#: I would like to book a table for two people tonight, please.",
    "What is the weather",
]


def completion(model: Path, adapter: Path | None, prompt: str | list[str], *,
               fmt: dict[str, Any] | None = None, **fields: Any) -> EngineCompletionRequest:
    target = {"model": "m", "base_model": str(model),
              "adapter_path": str(adapter) if adapter else None, "prompt_format": fmt}
    body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": 12,
            "raw_prompt": fmt is None, **fields}
    return EngineCompletionRequest.model_validate({**body, "target": target})


async def answer(engine: Any, body: Any) -> dict[str, Any]:
    request = await engine.submit(body)
    shaper = responses.Shaper("m", isinstance(body, EngineChatRequest), len(request.rows))
    return await responses.collect(request, shaper)


async def answer_all(engine: Any, bodies: list[Any]) -> list[dict[str, Any]]:
    requests = [await engine.submit(b) for b in bodies]  # all queued before the window ends
    return [await responses.collect(r, responses.Shaper("m", False, len(r.rows)))
            for r in requests]


def texts(result: dict[str, Any]) -> list[str]:
    return [c["text"] for c in result["choices"]]


def test_mixed_batch_equals_each_adapter_alone(make_engine: Any, tiny_model: Path,
                                               adapters: list[Path], reference: Any) -> None:
    # A long window and a batch of exactly 4 sequences: the 4 requests run as one batch.
    engine = make_engine(batch_window_ms=10_000, max_batch_size=4)
    chosen = [*adapters, None]
    bodies = [completion(tiny_model, a, p) for a, p in zip(chosen, PROMPTS, strict=True)]
    results = run(answer_all(engine, bodies))

    assert [(b["requests"], b["rows"], b["adapters"]) for b in engine.batcher.history] == [
        (4, 4, 3)]
    tokenizer = engine.host(str(tiny_model)).tokenizer
    outputs = []
    for adapter, prompt, result in zip(chosen, PROMPTS, results, strict=True):
        expected = reference(adapter, tokenizer(prompt, add_special_tokens=False)["input_ids"],
                             12)
        assert texts(result) == [tokenizer.decode(expected, skip_special_tokens=True)]
        assert result["usage"]["completion_tokens"] == len(expected)
        outputs.append(expected)
    # Different weights, different text: the comparison above could tell adapters apart.
    assert len({tuple(o) for o in outputs}) == 4


def test_same_prompt_three_adapters_one_batch(make_engine: Any, tiny_model: Path,
                                              adapters: list[Path], reference: Any) -> None:
    engine = make_engine(batch_window_ms=10_000, max_batch_size=3)
    prompt = PROMPTS[0]
    results = run(answer_all(engine, [completion(tiny_model, a, prompt) for a in adapters]))
    assert engine.batcher.history[-1]["rows"] == 3
    ids = engine.host(str(tiny_model)).encode(prompt)
    decode = engine.host(str(tiny_model)).tokenizer.decode
    expected = [decode(reference(a, ids, 12), skip_special_tokens=True) for a in adapters]
    assert [texts(r)[0] for r in results] == expected
    assert len(set(expected)) == 3


def test_adapter_cache_is_bounded_by_count(make_engine: Any, tiny_model: Path,
                                           adapters: list[Path], reference: Any) -> None:
    engine = make_engine(adapter_cache_count=2)
    host = engine.host(str(tiny_model))
    ids = host.encode(PROMPTS[1])
    for adapter in [*adapters, adapters[0]]:
        result = run(answer(engine, completion(tiny_model, adapter, PROMPTS[1])))
        assert texts(result) == [host.tokenizer.decode(reference(adapter, ids, 12),
                                                       skip_special_tokens=True)]
        assert len(host.adapters) <= 2
        # The cache and the model agree: evicted adapters are gone from the model.
        assert sorted(host.model.peft_config) == sorted(host.adapters.names())
    assert host.adapters.loads == 4  # adapter 0 was evicted, then loaded again
    assert host.adapters.evictions == 2


def test_adapter_cache_is_bounded_by_bytes(make_engine: Any, tiny_model: Path,
                                           adapters: list[Path]) -> None:
    one = (adapters[0] / "adapter_model.safetensors").stat().st_size
    engine = make_engine(adapter_cache_bytes=int(one * 1.5))
    host = engine.host(str(tiny_model))
    for adapter in adapters:
        run(answer(engine, completion(tiny_model, adapter, PROMPTS[0])))
        assert len(host.adapters) == 1
        assert host.adapters.bytes <= one * 1.5
        assert list(host.model.peft_config) == host.adapters.names()


def test_new_version_under_the_same_folder_is_served(make_engine: Any, tiny_model: Path,
                                                     tmp_path: Path, reference: Any) -> None:
    folder = build_adapter(tiny_model, tmp_path / "adapter", seed=7)
    engine = make_engine()
    host = engine.host(str(tiny_model))
    ids = host.encode(PROMPTS[0])
    first = texts(run(answer(engine, completion(tiny_model, folder, PROMPTS[0]))))
    old_names = host.adapters.names()

    build_adapter(tiny_model, folder, seed=8)  # a newer adapter, same folder
    second = texts(run(answer(engine, completion(tiny_model, folder, PROMPTS[0]))))

    expected = host.tokenizer.decode(reference(folder, ids, 12), skip_special_tokens=True)
    assert second == [expected] and second != first
    assert not set(old_names) & set(host.model.peft_config), "stale weights still loaded"


def test_deleted_adapter_is_unloaded(make_engine: Any, tiny_model: Path, tmp_path: Path,
                                     reference: Any) -> None:
    folder = build_adapter(tiny_model, tmp_path / "adapter", seed=9)
    engine = make_engine()
    host = engine.host(str(tiny_model))
    run(answer(engine, completion(tiny_model, folder, PROMPTS[0])))
    assert len(host.adapters) == 1

    shutil.rmtree(folder)
    with pytest.raises(NotFound):
        run(answer(engine, completion(tiny_model, folder, PROMPTS[0])))
    # The next batch drops it; the last adapter gone, the model is the plain base again.
    base = run(answer(engine, completion(tiny_model, None, PROMPTS[2])))
    assert len(host.adapters) == 0
    assert not hasattr(host.model, "peft_config")
    ids = host.encode(PROMPTS[2])
    assert texts(base) == [host.tokenizer.decode(reference(None, ids, 12),
                                                 skip_special_tokens=True)]


def test_an_adapter_that_fails_to_load_fails_only_its_requests(
        make_engine: Any, tiny_model: Path, adapters: list[Path], tmp_path: Path) -> None:
    doomed = build_adapter(tiny_model, tmp_path / "adapter", seed=11)
    engine = make_engine(start=False)

    async def scenario() -> tuple[Any, dict[str, Any]]:
        lost = await engine.submit(completion(tiny_model, doomed, PROMPTS[0]))
        fine = await engine.submit(completion(tiny_model, adapters[0], PROMPTS[1]))
        shutil.rmtree(doomed)  # gone between the request and its batch
        engine.start()
        with pytest.raises(NotFound) as caught:
            await responses.collect(lost, responses.Shaper("m", False, 1))
        return caught.value, await responses.collect(fine, responses.Shaper("m", False, 1))

    error, result = run(scenario())
    assert error.code == "adapter_missing"
    assert texts(result)[0] and result["choices"][0]["finish_reason"] == "length"
    host = engine.host(str(tiny_model))
    assert sorted(host.model.peft_config) == host.adapters.names()  # nothing half-loaded


def _greedy_text(engine: Any, model: Path, adapter: Path, prompt: str, n: int = 24) -> str:
    return texts(run(answer(engine, completion(model, adapter, prompt, max_tokens=n))))[0]


def test_prompt_is_wrapped_in_the_adapter_format(make_engine: Any, tiny_model: Path,
                                                 adapters: list[Path]) -> None:
    engine = make_engine()
    fmt = {"type": "dolly", "instruction": "Summarize the below conversation."}
    dialogue = PROMPTS[0] + "\n#Person2#: Fine, thanks."
    wrapped = run(answer(engine, completion(tiny_model, adapters[0], dialogue, fmt=fmt)))
    raw = run(answer(engine, completion(tiny_model, adapters[0],
                                        render_prompt(PromptFormat(**fmt), dialogue))))
    assert texts(wrapped) == texts(raw)
    assert wrapped["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"] > 20


def test_generation_stops_at_the_format_end_marker(make_engine: Any, tiny_model: Path,
                                                   adapters: list[Path]) -> None:
    engine = make_engine()
    prompt_template = "Q: {input}\nA:"
    full = _greedy_text(engine, tiny_model, adapters[1], prompt_template.format(input="Hello"))
    end = full[8:12]  # an end marker the model is known to produce
    assert end.strip() and full.index(end) >= 1
    fmt = {"type": "custom", "prompt_template": prompt_template,
           "response_template": "{output}", "end": end}
    result = run(answer(engine, completion(tiny_model, adapters[1], "Hello", fmt=fmt,
                                           max_tokens=24)))
    assert texts(result) == [full[:full.index(end)]]
    assert result["choices"][0]["finish_reason"] == "stop"
    # raw_prompt opts out of the format, its end marker included.
    raw = run(answer(engine, completion(tiny_model, adapters[1], "Q: Hello\nA:", max_tokens=24)))
    assert texts(raw) == [full] and raw["choices"][0]["finish_reason"] == "length"


def test_user_stop_sequences_and_streaming(make_engine: Any, tiny_model: Path,
                                           adapters: list[Path]) -> None:
    engine = make_engine()
    full = _greedy_text(engine, tiny_model, adapters[2], PROMPTS[3])
    stop = full[10:13]
    body = completion(tiny_model, adapters[2], PROMPTS[3], max_tokens=24, stop=[stop, "\x00"],
                      stream=True, stream_options={"include_usage": True})

    async def consume() -> list[str]:
        request = await engine.submit(body)
        return [e async for e in responses.stream(request, responses.Shaper("m", False, 1),
                                                  True)]

    events = run(consume())
    assert events[-1] == responses.DONE
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == full[:full.index(stop)]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert len(chunks) > 3  # text arrived in pieces, as it was generated


def test_sampling_is_reproducible_by_seed_whatever_the_batch(make_engine: Any,
                                                             tiny_model: Path,
                                                             adapters: list[Path]) -> None:
    engine = make_engine(batch_window_ms=10_000, max_batch_size=4)
    sampled = completion(tiny_model, adapters[0], PROMPTS[0], temperature=1.0, top_p=0.9,
                         seed=1234, n=2, max_tokens=16)
    alone = run(answer_all(engine, [sampled, completion(tiny_model, None, PROMPTS[1], n=2)]))
    mixed = run(answer_all(engine, [completion(tiny_model, adapters[1], PROMPTS[2], n=2),
                                    sampled]))
    other_seed = completion(tiny_model, adapters[0], PROMPTS[0], temperature=1.0, top_p=0.9,
                            seed=99, n=2, max_tokens=16)
    different = run(answer_all(engine, [other_seed,
                                        completion(tiny_model, None, PROMPTS[1], n=2)]))
    assert texts(alone[0]) == texts(mixed[1])
    assert texts(alone[0])[0] != texts(alone[0])[1]  # the n choices differ
    assert texts(different[0]) != texts(alone[0])


def test_queue_bound_refuses_with_retry_after(make_engine: Any, tiny_model: Path) -> None:
    engine = make_engine(start=False, max_queued_requests=2)

    async def scenario() -> tuple[Overloaded, list[dict[str, Any]]]:
        queued = [await engine.submit(completion(tiny_model, None, p)) for p in PROMPTS[:2]]
        with pytest.raises(Overloaded) as refused:
            await engine.submit(completion(tiny_model, None, PROMPTS[2]))
        engine.start()  # the waiting requests still complete
        done = [await responses.collect(r, responses.Shaper("m", False, 1)) for r in queued]
        return refused.value, done

    refused, done = run(scenario())
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert all(d["choices"][0]["finish_reason"] for d in done)
    assert engine.batcher.queued == 0


def test_a_request_whose_client_left_stops_generating(make_engine: Any,
                                                      tiny_model: Path) -> None:
    engine = make_engine()

    async def scenario() -> tuple[int, Any]:
        request = await engine.submit(completion(tiny_model, None, PROMPTS[0], max_tokens=500))
        event = await request.events.get()
        assert event[0] == "delta"  # generating
        engine.batcher.cancel(request)  # what the SSE response does when the client is gone
        while (await request.events.get())[0] != "done":
            pass
        return len(request.rows[0].generated), request.rows[0].finish_reason

    generated, reason = run(scenario())
    assert reason == "cancelled" and generated < 500

    # A request cancelled while it waits is dropped from the queue.
    idle = make_engine(start=False)

    async def waiting() -> int:
        request = await idle.submit(completion(tiny_model, None, PROMPTS[1]))
        assert idle.batcher.queued == 1
        idle.batcher.cancel(request)
        return idle.batcher.queued

    assert run(waiting()) == 0


@pytest.mark.parametrize(
    ("fields", "error", "param"),
    [
        ({"prompt": "word " * 1100}, ContextLengthExceeded, "prompt"),
        ({"prompt": "word " * 980, "max_tokens": 60}, ContextLengthExceeded, "max_tokens"),
        ({"max_tokens": 65}, InvalidRequest, "max_tokens"),
        ({"n": 3, "prompt": ["a", "b", "c"]}, InvalidRequest, "n"),
    ],
    ids=["prompt-longer-than-context", "prompt-plus-max-tokens", "max-tokens-limit",
         "too-many-sequences"],
)
def test_bad_input(make_engine: Any, tiny_model: Path, fields: dict[str, Any],
                   error: type[Exception], param: str) -> None:
    engine = make_engine(max_tokens_limit=64, max_batch_size=8)
    body = completion(tiny_model, None, fields.pop("prompt", "hi"), **fields)
    with pytest.raises(error) as caught:
        run(answer(engine, body))
    assert caught.value.status == 400 and caught.value.param == param
    assert engine.batcher.queued == 0


def test_chat_uses_the_chat_template_for_base_models(make_engine: Any, tiny_model: Path,
                                                     reference: Any) -> None:
    engine = make_engine()
    host = engine.host(str(tiny_model))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = EngineChatRequest.model_validate({
        "model": "m", "messages": messages, "temperature": 0, "max_tokens": 12,
        "target": {"model": "m", "base_model": str(tiny_model)}})
    result = run(answer(engine, chat))

    ids = host.tokenizer.apply_chat_template(messages, tokenize=True,
                                             add_generation_prompt=True, return_dict=True)
    expected = reference(None, list(ids["input_ids"]), 12)
    im_end = host.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # ChatML's end of turn ends a chat reply (as EOS does).
    assert host.chat_end_ids() == {im_end}
    ends = [i for i, t in enumerate(expected) if t in (im_end, host.tokenizer.eos_token_id)]
    expected = expected[:ends[0]] if ends else expected
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"] == {
        "role": "assistant", "refusal": None,
        "content": host.tokenizer.decode(expected, skip_special_tokens=True)}
    assert result["usage"]["prompt_tokens"] == len(ids["input_ids"])


def test_engine_keeps_serving_after_a_failed_request(make_engine: Any, tiny_model: Path) -> None:
    from modelio.loading import ModelLoadError

    engine = make_engine()
    with pytest.raises(ModelLoadError):
        run(answer(engine, completion(tiny_model.parent / "missing", None, "hi")))
    assert texts(run(answer(engine, completion(tiny_model, None, "hi"))))[0]
