"""Models: the project's base, fine-tuned and checkpoint models; deleting a fine-tuned one."""

from __future__ import annotations

from fastapi import APIRouter

from api import served_models
from api.deps import ProjectDep, SessionDep
from api.model_cache import model_cache
from api.served_models import ModelDeleted, ModelPublic, ModelsPublic
from api.status_cache import status_cache
from shared import deletions

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, project: ProjectDep) -> ModelsPublic:
    """Base models in use, the project's fine-tuned models and its jobs' checkpoints."""
    return served_models.list_models(session, project)


@router.get("/{model:path}", response_model=ModelPublic)
def retrieve_model(model: str, session: SessionDep, project: ProjectDep) -> ModelPublic:
    """One model of :func:`list_models`."""
    return served_models.get_model(session, project, model)


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(model: str, session: SessionDep, project: ProjectDep) -> ModelDeleted:
    """Delete a fine-tuned model (or a checkpoint's): its adapter's files go, its job keeps
    its history; the name is no longer listed or served."""
    doomed = served_models.delete_model(session, project, model)
    removal = deletions.schedule(session, folders=doomed)
    session.commit()  # first: a failed commit must leave the model whole, files included
    model_cache.forget((project, model))
    deletions.purge(removal)  # what the store does not take now, a worker deletes later
    job_id = served_models.job_of(model)
    if job_id is not None:
        status_cache.forget(job_id)
    return ModelDeleted(id=model)
