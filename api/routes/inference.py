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
from sqlalchemy.orm import Session

from api import metrics, served_models
from api.deps import ProjectDep, SessionDep
from api.engine import engine_client, engine_error
from api.served_models import PARITY_FAILED
from shared.errors import ServiceUnavailable
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest, Target

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["inference"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model"},
    409: {"description": "The model's fine-tuning job has not succeeded"},
    429: {"description": "Too many requests waiting; see Retry-After"},
    503: {"description": "The inference engine is unavailable"},
}


def _resolve(session: Session, project: str, model: str) -> Target:
    target = served_models.resolve_model(session, project, model)
    # Give the connection back to the pool now: a request may wait for the engine for long,
    # and sessions held that long would starve every other route of connections.
    session.commit()
    return target


async def _forward(request: Request, session: SessionDep, project: str, body: SamplingRequest,
                   path: str) -> Response:
    # The database lookup is blocking: keep it off the event loop.
    target = await run_in_threadpool(_resolve, session, project, body.model)
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
        await run_in_threadpool(_note_parity_failure, session, target.model, error)
    return answer


def _note_parity_failure(session: Session, model: str, error: dict[str, Any]) -> None:
    # The caller gets the engine's answer whatever happens here: the event is for the job's
    # owner, who reads it in the job's events.
    try:
        served_models.record_parity_failure(session, model, error)
        session.commit()
    except Exception:  # noqa: BLE001
        session.rollback()
        log.warning("could not record the parity failure of %s", model, exc_info=True)


@router.post("/completions", responses=_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request, session: SessionDep,
                            project: ProjectDep) -> Response:
    """A text completion; the prompt is wrapped in the adapter's prompt format unless
    ``raw_prompt`` is true. ``stream: true`` answers with server-sent events."""
    return await _forward(request, session, project, body, "/v1/completions")


@router.post("/chat/completions", responses=_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 session: SessionDep, project: ProjectDep) -> Response:
    """A chat completion. ``stream: true`` answers with server-sent events."""
    return await _forward(request, session, project, body, "/v1/chat/completions")
