"""The API's metrics in one process: requests by route template, the /metrics route and its
token, inference per model (with a stand-in engine), and labels that never take a raw path or
an unknown model's name."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi.responses import Response, StreamingResponse

from shared.db import session_scope
from shared.models import Job
from tests.metrics.conftest import scraped, value
from tests.support.processes import free_port

JOB_ROUTE = "/v1/fine_tuning/jobs/{job_id}"


def api_key(project: str = "p") -> dict[str, str]:
    from api.auth import create_key

    with session_scope() as s:
        _, key = create_key(s, project)
    return {"Authorization": f"Bearer {key}"}


def base_model_in_use(project: str = "p") -> str:
    """A base model the project may use (one of its jobs succeeded on it)."""
    model = f"base-{secrets.token_hex(4)}"
    with session_scope() as s:
        s.add(Job(id=f"ftjob-{secrets.token_hex(6)}", project=project, created_at=1,
                  model=model, status="succeeded", training_file="file-x", spec={}, seed=0))
    return model


class StandInEngine:
    """Answers every forwarded request with what the test set: a body or a list of SSE events."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] | list[dict[str, Any]] = {}

    async def forward(self, path: str, payload: dict[str, Any], caller: Any = None) -> Response:
        if isinstance(self.answer, dict):
            return Response(json.dumps(self.answer), media_type="application/json")
        events = [f"data: {json.dumps(e)}\n\n" for e in self.answer] + ["data: [DONE]\n\n"]
        # Split across the events' boundaries, as a relay of raw bytes may.
        text = "".join(events)
        pieces = [text[i:i + 7].encode() for i in range(0, len(text), 7)]

        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return StreamingResponse(body(), media_type="text/event-stream")

    async def aclose(self) -> None:
        pass


@pytest.fixture
def api(started_app: Callable[..., Any]) -> Any:
    return started_app()


@pytest.fixture
def engine(api: Any) -> StandInEngine:
    stand_in = StandInEngine()
    api.app.state.engine = stand_in
    return stand_in


# --------------------------------------------------------------------------- HTTP requests
def test_requests_are_counted_by_route_template_and_status(api: Any) -> None:
    headers = api_key()
    labels = {"method": "GET", "route": JOB_ROUTE, "status": "404"}
    before = value("lorafleet_http_requests_total", **labels)
    timed = value("lorafleet_http_request_duration_seconds_count", method="GET", route=JOB_ROUTE)

    for job_id in ("ftjob-aaaa", "ftjob-bbbb"):
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).status_code == 404

    assert value("lorafleet_http_requests_total", **labels) == before + 2
    assert value("lorafleet_http_request_duration_seconds_count", method="GET",
                 route=JOB_ROUTE) == timed + 2
    text = api.get("/metrics").text
    assert "ftjob-aaaa" not in text and "ftjob-bbbb" not in text


def test_paths_no_route_handles_and_odd_methods_get_one_label_each(api: Any) -> None:
    unmatched = value("lorafleet_http_requests_total", method="GET", route="unmatched",
                      status="404")
    other = value("lorafleet_http_requests_total", method="other", route="/health",
                  status="405")

    for path in ("/no/such/path", "/another/one"):
        assert api.get(path).status_code == 404
    assert api.request("BREW", "/health").status_code == 405

    assert value("lorafleet_http_requests_total", method="GET", route="unmatched",
                 status="404") == unmatched + 2
    assert value("lorafleet_http_requests_total", method="other", route="/health",
                 status="405") == other + 1
    text = api.get("/metrics").text
    assert "/no/such/path" not in text and "BREW" not in text


def test_a_body_refused_before_routing_is_counted(started_app: Callable[..., Any]) -> None:
    api = started_app(max_request_bytes=100)
    before = value("lorafleet_http_requests_total", method="POST", route="unmatched",
                   status="413")
    answer = api.post("/v1/fine_tuning/jobs", content=b"x" * 200,
                      headers={"content-type": "application/json", **api_key()})
    assert answer.status_code == 413
    assert value("lorafleet_http_requests_total", method="POST", route="unmatched",
                 status="413") == before + 1


# --------------------------------------------------------------------------- /metrics
def test_metrics_answers_without_a_key_in_prometheus_text_format(api: Any) -> None:
    answer = api.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples = scraped(answer.text)
    names = {name for name, _ in samples}
    for name in ("lorafleet_jobs", "lorafleet_queue_depth",
                 "lorafleet_oldest_queued_job_age_seconds", "lorafleet_job_attempts_total",
                 "lorafleet_job_requeues_total", "lorafleet_webhook_sends_total",
                 "lorafleet_http_requests_total"):
        assert name in names, name
    assert "/metrics" not in api.app.openapi()["paths"]


def test_with_a_token_set_metrics_needs_it(started_app: Callable[..., Any]) -> None:
    api = started_app(metrics_token="s3cret-token")

    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers=api_key()).status_code == 401  # a project's key: no
    wrong = api.get("/metrics", headers={"Authorization": "Bearer s3cret-tokeN"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    right = api.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert right.status_code == 200 and "lorafleet_jobs" in right.text


# --------------------------------------------------------------------------- inference
def test_a_completion_counts_its_request_tokens_and_time_for_its_model(
        api: Any, engine: StandInEngine) -> None:
    headers, model = api_key(), base_model_in_use()
    engine.answer = {"object": "text_completion", "model": model, "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}

    for _ in range(2):
        answer = api.post("/v1/completions", headers=headers,
                          json={"model": model, "prompt": "hi", "max_tokens": 5})
        assert answer.status_code == 200

    assert value("lorafleet_inference_requests_total", model=model, endpoint="completions",
                 status="200") == 2
    assert value("lorafleet_inference_tokens_total", model=model, type="prompt") == 14
    assert value("lorafleet_inference_tokens_total", model=model, type="completion") == 10
    assert value("lorafleet_inference_request_duration_seconds_count", model=model,
                 endpoint="completions") == 2


def chunk(text: str | None = None, reason: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def test_a_stream_counts_its_usage_chunk_when_it_has_one(api: Any,
                                                         engine: StandInEngine) -> None:
    headers, model = api_key(), base_model_in_use()
    engine.answer = [{"object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                     chunk("Hel"), chunk("lo"), chunk(reason="stop"),
                     {"object": "chat.completion.chunk", "choices": [],
                      "usage": {"prompt_tokens": 9, "completion_tokens": 3}}]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}

    with api.stream("POST", "/v1/chat/completions", headers=headers, json=body) as answer:
        assert answer.status_code == 200
        assert b"".join(answer.iter_bytes()).endswith(b"data: [DONE]\n\n")

    assert value("lorafleet_inference_requests_total", model=model,
                 endpoint="chat.completions", status="200") == 1
    assert value("lorafleet_inference_tokens_total", model=model, type="prompt") == 9
    assert value("lorafleet_inference_tokens_total", model=model, type="completion") == 3
    assert value("lorafleet_inference_time_to_first_token_seconds_count", model=model) == 1
    assert value("lorafleet_inference_request_duration_seconds_count", model=model,
                 endpoint="chat.completions") == 1


def test_a_stream_without_usage_counts_its_chunks_of_text(api: Any,
                                                          engine: StandInEngine) -> None:
    headers, model = api_key(), base_model_in_use()
    engine.answer = [{"object": "text_completion", "choices": [{"index": 0, "text": t}]}
                     for t in ("a", "b", "c", "d", "")]

    answer = api.post("/v1/completions", headers=headers,
                      json={"model": model, "prompt": "hi", "stream": True})
    assert answer.status_code == 200

    assert value("lorafleet_inference_tokens_total", model=model, type="completion") == 4
    assert value("lorafleet_inference_tokens_total", model=model, type="prompt") == 0


def test_an_unknown_model_never_becomes_a_label(api: Any, engine: StandInEngine) -> None:
    name = f"no-such-model-{secrets.token_hex(4)}"
    answer = api.post("/v1/completions", headers=api_key(),
                      json={"model": name, "prompt": "hi"})
    assert answer.status_code == 404
    assert name not in api.get("/metrics").text


def test_an_engine_that_does_not_answer_counts_a_503_for_the_model(
        started_app: Callable[..., Any]) -> None:
    api = started_app(engine_url=f"http://127.0.0.1:{free_port()}")
    model = base_model_in_use()
    answer = api.post("/v1/completions", headers=api_key(),
                      json={"model": model, "prompt": "hi"})
    assert answer.status_code == 503
    assert value("lorafleet_inference_requests_total", model=model, endpoint="completions",
                 status="503") == 1


def test_a_stream_the_client_leaves_closes_the_relay_under_it_at_once() -> None:
    from api.metrics import _metered

    closed = []

    async def relay() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
        finally:
            closed.append(True)

    async def leave_after_two() -> None:
        stream = _metered(relay(), "m-left", "completions", 0.0)
        for _ in range(2):
            await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        assert closed == [True]

    asyncio.run(leave_after_two())
