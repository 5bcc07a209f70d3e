"""When the engine refuses a fine-tuned model because it does not reproduce its parity probe,
the caller gets the engine's answer unchanged and the model's job gets one error event."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.engine.test_model_resolution import BASE, add_job

PARITY_ERROR = {"error": {
    "message": "The adapter does not reproduce its parity probe: token 3 is 17, not 42.",
    "type": "invalid_request_error", "param": "model", "code": "adapter_parity_failed"}}


class FakeEngine:
    """The engine's HTTP answers, set by the test; the requests it got."""

    def __init__(self) -> None:
        self.status = 422
        self.body: dict[str, Any] = PARITY_ERROR
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        return httpx.Response(self.status, json=self.body)


@pytest.fixture
def api(started_app: Callable[..., TestClient]) -> Iterator[tuple[TestClient, FakeEngine]]:
    client = started_app(engine_url="http://engine.invalid")
    engine = FakeEngine()
    # The API's own client of the engine, over a transport that answers as the test says.
    client.app.state.engine._client = httpx.AsyncClient(  # type: ignore[attr-defined]
        base_url="http://engine.invalid", transport=httpx.MockTransport(engine))
    yield client, engine


@pytest.fixture
def setup(api: tuple[TestClient, FakeEngine]) -> tuple[dict[str, str], Any, Any]:
    """An API key of project ``p``, and two succeeded jobs of it."""
    from api.auth import create_key
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as s:
        job, other = add_job(s, "succeeded"), add_job(s, "succeeded")
        _, key = create_key(s, "p")
        s.commit()
    return {"Authorization": f"Bearer {key}"}, job, other


def error_events(client: TestClient, headers: dict[str, str], job_id: str) -> list[Any]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=headers).json()
    return [e for e in events["data"] if e["level"] == "error"]


def test_a_parity_refusal_is_passed_on_and_noted_once_on_the_job(
    api: tuple[TestClient, FakeEngine], setup: tuple[dict[str, str], Any, Any],
) -> None:
    client, engine = api
    headers, job, other = setup
    model = job.fine_tuned_model
    answers = [
        client.post("/v1/completions", headers=headers,
                    json={"model": model, "prompt": "hi", "max_tokens": 4}),
        client.post("/v1/completions", headers=headers,
                    json={"model": model, "prompt": "hi", "max_tokens": 4, "stream": True}),
        client.post("/v1/chat/completions", headers=headers,
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    ]

    assert len(engine.requests) == 3
    for answer in answers:
        assert answer.status_code == 422
        assert answer.json() == PARITY_ERROR
    events = error_events(client, headers, job.id)
    assert len(events) == 1, events
    assert PARITY_ERROR["error"]["message"] in events[0]["message"]
    assert model in events[0]["message"]
    assert events[0]["data"] == {"code": "adapter_parity_failed", "model": model}
    assert error_events(client, headers, other.id) == []


@pytest.mark.parametrize("status, body", [
    (422, {"error": {"message": "no", "type": "invalid_request_error", "param": "model",
                     "code": "adapter_rejected"}}),
    (400, {"error": {"message": "too long", "type": "invalid_request_error",
                     "param": "max_tokens", "code": "context_length_exceeded"}}),
    (200, {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
])
def test_other_answers_add_no_event(api: tuple[TestClient, FakeEngine],
                                    setup: tuple[dict[str, str], Any, Any], status: int,
                                    body: dict[str, Any]) -> None:
    client, engine = api
    headers, job, _ = setup
    engine.status, engine.body = status, body
    answer = client.post("/v1/completions", headers=headers,
                         json={"model": job.fine_tuned_model, "prompt": "hi", "max_tokens": 4})
    assert (answer.status_code, answer.json()) == (status, body)
    assert error_events(client, headers, job.id) == []


def test_a_base_model_refused_for_parity_has_no_job_to_note(
    api: tuple[TestClient, FakeEngine], setup: tuple[dict[str, str], Any, Any],
) -> None:
    client, _ = api
    headers, job, other = setup
    answer = client.post("/v1/completions", headers=headers,
                         json={"model": BASE, "prompt": "hi", "max_tokens": 4})
    assert (answer.status_code, answer.json()) == (422, PARITY_ERROR)
    assert error_events(client, headers, job.id) == error_events(client, headers, other.id) == []
