"""Inference, OpenAI-compatible: models, completions and chat completions of the project's
fine-tuned models and their base models. Generation runs in the engine (``lorafleet serve``);
these routes authenticate, resolve the model for the caller's project and forward."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api import served_models
from api.deps import ProjectDep, SessionDep
from api.engine import engine_client
from api.served_models import ModelPublic, ModelsPublic
from shared.inference import ChatCompletionRequest, CompletionRequest, SamplingRequest, Target

router = APIRouter(prefix="/v1", tags=["inference"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model"},
    409: {"description": "The model's fine-tuning job has not succeeded"},
    429: {"description": "Too many requests waiting; see Retry-After"},
    503: {"description": "The inference engine is unavailable"},
}


@router.get("/models", response_model=ModelsPublic)
def list_models(session: SessionDep, project: ProjectDep) -> ModelsPublic:
    """Base models in use and every fine-tuned model of the project's succeeded jobs."""
    return served_models.list_models(session, project)


@router.get("/models/{model:path}", response_model=ModelPublic)
def retrieve_model(model: str, session: SessionDep, project: ProjectDep) -> ModelPublic:
    """One model of :func:`list_models`."""
    return served_models.get_model(session, project, model)


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
    return await engine_client(request).forward(path, payload, request)


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
