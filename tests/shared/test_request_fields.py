"""Every field of the openai SDK's completion and chat completion parameters is decided: honoured
(a field of lorafleet's request model), refused with a 400 that names it and says why, or
accepted as documented to change nothing. A field a new SDK adds fails here until it is decided.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared import http_errors
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest
from shared.request_fields import (
    REFUSED_CHAT,
    REFUSED_COMPLETION,
    WITHOUT_EFFECT,
    Refusal,
)

openai_types = pytest.importorskip("openai.types")
chat_types = pytest.importorskip("openai.types.chat")


def sdk_fields(params: Any) -> set[str]:
    """The typed parameter names of an SDK ``...CreateParams`` (a union of TypedDicts)."""
    names: set[str] = set()
    for branch in typing.get_args(params) or (params,):
        names |= set(typing.get_type_hints(branch))
    return names


ENDPOINTS = {
    "completions": (openai_types.CompletionCreateParams, CompletionRequest, REFUSED_COMPLETION),
    "chat": (chat_types.CompletionCreateParams, ChatCompletionRequest, REFUSED_CHAT),
}
BODIES = {"completions": {"model": "m", "prompt": "Hi"},
          "chat": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_sdk_field_is_decided(endpoint: str) -> None:
    params, model, refused = ENDPOINTS[endpoint]
    fields = sdk_fields(params)
    assert {"model", "stream", "temperature"} <= fields  # the SDK's types were read
    honoured = set(model.model_fields) - set(refused)
    undecided = fields - honoured - set(refused) - set(WITHOUT_EFFECT)
    assert not undecided, f"decide these {endpoint} fields in shared/request_fields.py"
    # A refusal is for a field the model does not serve, never one it also honours.
    assert all(isinstance(r, Refusal) and r.reason for r in refused.values())


def test_stream_options_fields_are_decided() -> None:
    from openai.types.chat import ChatCompletionStreamOptionsParam

    from shared.inference import StreamOptions

    assert set(typing.get_type_hints(ChatCompletionStreamOptionsParam)) <= set(
        StreamOptions.model_fields)


# One value per refused field that asks for something.
ASKING = {"suffix": "world", "best_of": 3, "audio": {"voice": "alloy", "format": "wav"},
          "modalities": ["text", "audio"], "functions": [{"name": "f"}],
          "function_call": "auto", "prediction": {"type": "content", "content": "x"},
          "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
          "moderation": {"model": "x"}, "store": True, "metadata": {"k": "v"},
          "service_tier": "priority"}


@pytest.fixture(scope="module")
def app() -> TestClient:
    """The request models behind HTTP routes, with the services' error handlers."""
    api = FastAPI()
    http_errors.install(api)

    @api.post("/v1/completions")
    def completions(body: CompletionRequest) -> dict[str, Any]:
        return body.model_dump(mode="json", exclude_unset=True)

    @api.post("/v1/chat/completions")
    def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return body.model_dump(mode="json", exclude_unset=True)

    return TestClient(api)


def _path(endpoint: str) -> str:
    return "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"


@pytest.mark.parametrize(("endpoint", "field"), [
    (e, f) for e, (_, _, refused) in ENDPOINTS.items() for f in refused])
def test_a_refused_field_is_a_400_that_names_it_and_says_why(app: TestClient, endpoint: str,
                                                             field: str) -> None:
    answer = app.post(_path(endpoint), json={**BODIES[endpoint], field: ASKING[field]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"'{field}' is not supported: ")
    assert len(error["message"]) > len(f"'{field}' is not supported: ") + 10


@pytest.mark.parametrize(("endpoint", "field", "value"), [
    ("completions", "best_of", 1), ("completions", "suffix", ""), ("chat", "store", False),
    ("chat", "service_tier", "auto"), ("chat", "modalities", ["text"]), ("chat", "metadata", {}),
    ("chat", "user", "u-1"), ("completions", "prompt_cache_key", "k")])
def test_values_that_ask_for_nothing_pass(app: TestClient, endpoint: str, field: str,
                                          value: Any) -> None:
    answer = app.post(_path(endpoint), json={**BODIES[endpoint], field: value})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("endpoint", "field"), [
    (e, f) for e, (_, _, refused) in ENDPOINTS.items() for f in refused])
@pytest.mark.parametrize("value", [False, 0, 1.5, "x", {"a": [1]}, [None], [[]]])
def test_a_refused_field_of_any_type_is_answered_4xx(app: TestClient, endpoint: str,
                                                     field: str, value: Any) -> None:
    """Whatever JSON a client puts in a refused field, the check answers; it never fails."""
    answer = app.post(_path(endpoint), json={**BODIES[endpoint], field: value})
    assert answer.status_code in (200, 400, 422), answer.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_unknown_field_is_refused_not_dropped(app: TestClient, endpoint: str) -> None:
    answer = app.post(_path(endpoint), json={**BODIES[endpoint], "top_k": 5})
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "message": "Unrecognized request argument supplied: top_k", "type":
        "invalid_request_error", "param": "top_k", "code": "unknown_parameter"}


def test_the_extension_and_every_honoured_field_pass(app: TestClient) -> None:
    body = {**BODIES["completions"], "prompt": [[1, 2], [3]], "max_tokens": 0, "echo": True,
            "logprobs": 5, "n": 2, "seed": 1, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "logit_bias": {"7": -100}, "raw_prompt": True}
    assert app.post("/v1/completions", json=body).json()["logit_bias"] == {"7": -100.0}
    assert issubclass(CompletionRequest, SamplingRequest)


@pytest.mark.parametrize(("body", "message"), [
    ({"max_tokens": 0}, "echo: true"), ({"logprobs": 21}, "logprobs"),
    ({"prompt": [[]]}, "at least one token"), ({"logit_bias": {"5": 101}}, "-100 to 100")])
def test_bad_completion_values(app: TestClient, body: dict[str, Any], message: str) -> None:
    answer = app.post("/v1/completions", json={**BODIES["completions"], **body})
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]


@pytest.mark.parametrize(("body", "message"), [
    ({"top_logprobs": 3}, "needs logprobs"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "not one of the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"response_format": {"type": "json_schema"}}, "needs json_schema"),
    ({"messages": [{"role": "tool", "content": "4"}]}, "tool_call_id")])
def test_bad_chat_values(app: TestClient, body: dict[str, Any], message: str) -> None:
    answer = app.post("/v1/chat/completions", json={**BODIES["chat"], **body})
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]
