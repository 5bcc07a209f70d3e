"""The vLLM gateway's decisions against a mock vLLM: the parity modes (strict refuses, warn
serves, off skips the probe), the rank check, and how requests become vLLM requests and its
answers our counts and logprobs. Real vLLM runs in ``test_vllm.py``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.adapters import adapter_ref
from engine.decoding import Row
from engine.errors import AdapterParityFailed
from engine.logprobs import (
    TokenLogprob,
    completion_logprobs,
    parse_vllm_completion,
    parse_vllm_prompt,
)
from engine.prompts import Prepared
from engine.vllm import relay
from engine.vllm.lora import Loras, check_rank, read_probe
from engine.vllm.servers import VllmServer
from shared.errors import InvalidRequest
from shared.inference import CompletionRequest
from shared.settings import Settings
from tests.engine.conftest import build_adapter, run


class MockVllm:
    """vLLM's adapter and completion routes; completions answer ``tokens``."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append((request.url.path, body))
        if request.url.path == "/v1/completions":
            return httpx.Response(200, json={"choices": [
                {"index": 0, "text": "x", "token_ids": self.tokens, "finish_reason": "length"}]})
        return httpx.Response(200, text="Success")

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]


@pytest.fixture(scope="module")
def probed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(tiny_model, tmp_path_factory.mktemp("probed") / "adapter", 7,
                         probe=True)


def load(mode: str, adapter: Path, tiny_model: Path,
         tokens: Callable[[list[int]], list[int]]) -> tuple[MockVllm, VllmServer, Any]:
    """Load ``adapter`` on a mock server whose probe answer is ``tokens(peft's tokens)``;
    the mock, the server and the outcome (the lora name or the error)."""
    from modelio.model_text import ModelText

    probe = read_probe(adapter)
    assert probe is not None
    mock = MockVllm(tokens(probe.token_ids))
    client = httpx.AsyncClient(transport=httpx.MockTransport(mock))
    loras = Loras(Settings(parity_check=mode), client)
    server = VllmServer(str(tiny_model), "http://vllm.invalid")
    text = ModelText(str(tiny_model))

    async def go() -> Any:
        try:
            return await loras.ensure(server, adapter_ref(adapter), text)
        except AdapterParityFailed as e:
            return e
        finally:
            await client.aclose()

    return mock, server, run(go())


def test_strict_refuses_an_adapter_that_vllm_does_not_reproduce(probed: Path,
                                                                tiny_model: Path) -> None:
    mock, server, outcome = load("strict", probed, tiny_model, lambda t: [*t[:-1], t[-1] + 1])
    assert isinstance(outcome, AdapterParityFailed)
    assert outcome.status == 422 and outcome.code == "adapter_parity_failed"
    assert mock.paths() == ["/v1/load_lora_adapter", "/v1/completions",
                            "/v1/unload_lora_adapter"]
    assert server.adapters == {}
    # The probe was replayed as peft generated it: greedy, its prompt, its length and stops.
    probe = read_probe(probed)
    assert probe is not None
    replay = mock.calls[1][1]
    assert replay["prompt"] == probe.prompt_ids and replay["temperature"] == 0
    assert replay["max_tokens"] == len(probe.token_ids)
    assert replay["stop_token_ids"] == probe.stop_token_ids and replay["return_token_ids"]


@pytest.mark.parametrize("mode", ["strict", "warn", "off"])
def test_an_adapter_is_served_when_it_matches_or_the_check_allows(
    probed: Path, tiny_model: Path, mode: str,
) -> None:
    wrong = mode != "strict"
    mock, server, outcome = load(mode, probed, tiny_model,
                                 (lambda t: t[::-1]) if wrong else (lambda t: t))
    assert outcome == adapter_ref(probed).name and outcome in server.adapters
    probes = mock.paths().count("/v1/completions")
    assert probes == (0 if mode == "off" else 1)


def test_an_adapter_without_a_probe_is_served_unchecked(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    plain = build_adapter(tiny_model, tmp_path / "plain", 8)
    assert read_probe(plain) is None
    mock = MockVllm([])
    client = httpx.AsyncClient(transport=httpx.MockTransport(mock))
    from modelio.model_text import ModelText

    server = VllmServer(str(tiny_model), "http://vllm.invalid")
    name = run(Loras(Settings(), client).ensure(server, adapter_ref(plain),
                                                ModelText(str(tiny_model))))
    assert name in server.adapters and mock.paths() == ["/v1/load_lora_adapter"]


def test_the_rank_check_names_the_setting(tiny_model: Path, tmp_path: Path) -> None:
    wide = build_adapter(tiny_model, tmp_path / "wide", 9, r=40)
    assert check_rank(adapter_ref(wide), 64) == 40
    with pytest.raises(InvalidRequest) as refused:
        check_rank(adapter_ref(wide), 32)
    assert refused.value.status == 400 and refused.value.param == "model"
    assert "LORAFLEET_VLLM_MAX_LORA_RANK to 64" in refused.value.message


def rows(prompts: list[list[int]], n: int, temperature: float) -> Prepared:
    made = [Row(prompt_ids=ids, max_new_tokens=5, adapter="a", stops=["###"],
                stop_ids=frozenset({0}), temperature=temperature)
            for ids in prompts for _ in range(n)]
    return Prepared(made, sum(len(p) for p in prompts))


def test_greedy_choices_are_generated_once_and_copied() -> None:
    req = CompletionRequest(model="m", prompt=["a", "b"], n=3, temperature=0, seed=10)
    upstreams = relay.plan(rows([[5, 6], [7]], 3, 0.0), req, "lora_x", stream=False)
    assert [u.payload["n"] for u in upstreams] == [1, 1]  # vLLM refuses greedy n > 1
    assert [list(u.indexes(0)) for u in upstreams] == [[0, 1, 2], [3, 4, 5]]
    assert upstreams[1].payload["prompt"] == [7] and upstreams[1].payload["seed"] == 13
    assert upstreams[0].payload["stop"] == ["###"] and upstreams[0].payload["stop_token_ids"] == [0]
    sampled = relay.plan(rows([[5]], 3, 0.7), req, "lora_x", stream=True)
    assert sampled[0].payload["n"] == 3 and [list(sampled[0].indexes(i)) for i in range(3)] == [
        [0], [1], [2]]


def test_the_stop_token_is_not_counted_as_the_built_in_engine_counts() -> None:
    upstream = relay.Upstream({}, 0, 1, Row(prompt_ids=[1], max_new_tokens=5, adapter="a",
                                            stop_ids=frozenset({0})))
    upstream.tokens[0] = [4, 9, 0]
    assert relay.completion_tokens(upstream, 0, "stop", None) == 2  # ended by eos
    assert relay.completion_tokens(upstream, 0, "stop", 0) == 2  # by a stop token id
    upstream.tokens[0] = [4, 9, 3]
    assert relay.completion_tokens(upstream, 0, "stop", "###") == 3  # by a stop string
    assert relay.completion_tokens(upstream, 0, "length", None) == 3


def test_vllm_logprobs_become_ranked_alternatives_and_openais_object() -> None:
    # As vLLM answers with logprobs 2: the token chosen first (here not the most likely, and
    # once also among the top 2), then the most likely; an echoed prompt's first token None.
    answer = {"tokens": ["token_id:7", "token_id:3"], "token_logprobs": [-1.5, -0.2],
              "top_logprobs": [{"token_id:7": -1.5, "token_id:4": -0.5, "token_id:9": -0.9},
                               {"token_id:3": -0.2, "token_id:5": -2.0}]}
    entries = parse_vllm_completion(answer, 2)
    assert entries == [TokenLogprob(7, -1.5, ((4, -0.5), (9, -0.9))),
                       TokenLogprob(3, -0.2, ((3, -0.2), (5, -2.0)))]
    assert parse_vllm_completion(answer, 1)[0].top == ((4, -0.5),)
    prompt = parse_vllm_prompt([2, 7], [None, {"7": {"logprob": -3.0, "rank": 4},
                                               "1": {"logprob": -0.1, "rank": 1}}], 1)
    assert prompt == [TokenLogprob(2, None), TokenLogprob(7, -3.0, ((1, -0.1),))]

    text = {1: "a", 2: "<s>", 3: "cd", 4: "e", 5: "f", 7: "gh", 9: "e"}.__getitem__
    shaped = completion_logprobs(prompt + entries, text, offset=10)
    assert shaped == {
        "tokens": ["<s>", "gh", "gh", "cd"], "token_logprobs": [None, -3.0, -1.5, -0.2],
        # Tokens of the same text (4 and 9 are both "e") keep the most likely's logprob.
        "top_logprobs": [None, {"a": -0.1, "gh": -3.0}, {"e": -0.5, "gh": -1.5},
                         {"cd": -0.2, "f": -2.0}],
        "text_offset": [10, 13, 15, 17]}
