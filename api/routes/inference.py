"""Inference, OpenAI-compatible: completions and chat completions of the project's
fine-tuned models and their base models (listed by :mod:`api.routes.models`). Generation runs
in the engine (``lorafleet serve``); these routes authenticate, resolve the model for the
caller's project and forward."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api import metrics, model_cache, served_models
from api.deps import AsyncProjectDep
from api.engine import engine_client, engine_error
from api.served_models import PARITY_FAILED
from shared.db import session_scope
from shared.errors import ServiceUnavailable
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["inference"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model"},
    409: {"description": "The model's fine-tuning job has not succeeded"},
    429: {"description": "Too many requests waiting; see Retry-After"},
    503: {"description": "The inference engine is unavailable"},
}


async def _forward(request: Request, project: str, body: SamplingRequest, path: str
                   ) -> Response:
    # Async all the way, with no session: a request may wait for the engine for long, and the
    # model is resolved from api.model_cache (a database read in the thread pool on a miss).
    target = await model_cache.resolve(project, body.model)
    payload = {**body.model_dump(mode="json", exclude_unset=True),
               "target": target.model_dump(mode="json")}
    started = time.perf_counter()
    try:
        answer = await engine_client(request).forward(path, payload, request)
    except ServiceUnavailable:
        metrics.inference_unavailable(target.model, path, started)
        raise
    metrics.observe_inference(target.model, path, started, answer)
    error = engine_error(answer) if target.adapter_path is not None else None
    if error is not None and error.get("code") == PARITY_FAILED:
        await run_in_threadpool(_note_parity_failure, target.model, error)
    return answer


def _note_parity_failure(model: str, error: dict[str, Any]) -> None:
    # The caller gets the engine's answer whatever happens here: the event is for the job's
    # owner, who reads it in the job's events.
    try:
        with session_scope() as session:
            served_models.record_parity_failure(session, model, error)
    except Exception:  # noqa: BLE001
        log.warning("could not record the parity failure of %s", model, exc_info=True)


@router.post("/completions", responses=_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request,
                            project: AsyncProjectDep) -> Response:
    """A text completion; the prompt is wrapped in the adapter's prompt format unless
    ``raw_prompt`` is true. ``stream: true`` answers with server-sent events."""
    return await _forward(request, project, body, "/v1/completions")


@router.post("/chat/completions", responses=_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 project: AsyncProjectDep) -> Response:
    """A chat completion. ``stream: true`` answers with server-sent events."""
    return await _forward(request, project, body, "/v1/chat/completions")
