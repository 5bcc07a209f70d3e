"""Continued training: a job whose ``model`` is a fine-tuned model (``ft:…``) or one of its
checkpoints (``ft:…:ckpt-step-N``) trains that adapter further.

The name is resolved as inference resolves it (:func:`api.served_models.trained_adapter`), so
only the caller's project's models can be named. The new job trains on the same base model
with the same LoRA shape (r, alpha, target modules: the weights it starts from have that
shape); a request may repeat the shape but not change it. Its prompt format is the source's
unless the request names one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api import served_models
from api.served_models import TrainedAdapter
from shared import storage
from shared.errors import InvalidRequest, NotFound
from shared.schemas import JobCreate, LoraSpec, TrainingSpec
from shared.storage import ObjectMissing
from shared.templates import PromptFormat


@dataclass(frozen=True)
class Start:
    """What a continued job takes from the model it continues from."""

    base_model: str
    lora: LoraSpec
    prompt_format: PromptFormat
    initial_model: str
    initial_adapter: str  # the adapter's folder: its key in storage


def is_continuation(model: str) -> bool:
    """Whether a job's ``model`` names a fine-tuned model or checkpoint to continue from."""
    return model.startswith(served_models.FINE_TUNED_PREFIX)


def continue_from(session: Session, req: JobCreate, project: str) -> Start:
    """Where a job whose ``model`` is ``ft:…`` starts.

    Raises:
        NotFound: no such model in this project (another project's, deleted, a checkpoint
            retention removed), or its adapter's files are gone.
        ModelNotReady: a fine-tuned model whose job has not succeeded.
        InvalidRequest: the request's ``lora`` changes the source's r, alpha or target
            modules (the field is named).
    """
    # Locked first: a concurrent delete of the model then sees this job (409), or this
    # request sees the model deleted (404); never a job that starts from deleted files.
    served_models.lock_model(session, project, req.model)
    adapter = served_models.trained_adapter(session, project, req.model)
    if not served_models.has_adapter_files(adapter.folder):
        raise NotFound(f"The model '{req.model}' does not exist or you do not have access to "
                       "it: its adapter's files are gone.", param="model",
                       code="model_not_found")
    source = TrainingSpec.model_validate(adapter.job.spec)
    fmt = (PromptFormat.parse(req.prompt_format) if req.prompt_format is not None
           else source.prompt_format)
    return Start(base_model=adapter.job.model, lora=_lora(req, adapter, source.lora),
                 prompt_format=fmt, initial_model=req.model,
                 initial_adapter=adapter.folder)


def _lora(req: JobCreate, adapter: TrainedAdapter, source: LoraSpec) -> LoraSpec:
    """The source's LoRA shape; the request's dropout if it gives one (dropout is not part of
    the weights)."""
    if "lora" not in req.model_fields_set:
        return source
    given = req.lora.model_fields_set
    for name in ("r", "alpha"):
        if name in given and getattr(req.lora, name) != getattr(source, name):
            raise _shape_changed(req.model, f"lora.{name}", getattr(req.lora, name),
                                 getattr(source, name))
    if "target_modules" in given and req.lora.target_modules is not None:
        trained = source.target_modules or _trained_targets(adapter)
        if trained is None or set(req.lora.target_modules) != set(trained):
            raise _shape_changed(req.model, "lora.target_modules", req.lora.target_modules,
                                 trained)
    if "dropout" in given:
        return source.model_copy(update={"dropout": req.lora.dropout})
    return source


def _trained_targets(adapter: TrainedAdapter) -> list[str] | None:
    """The modules the adapter's weights are on, from PEFT's ``adapter_config.json`` (the
    source job named none: its architecture's defaults were used)."""
    try:
        targets = json.loads(storage.get_store().get_bytes(
            storage.join(adapter.folder, "adapter_config.json")))
    except (ObjectMissing, ValueError):
        return None
    targets = targets.get("target_modules") if isinstance(targets, dict) else None
    return sorted(targets) if isinstance(targets, list) else None


def _shape_changed(model: str, field: str, asked: object, trained: object) -> InvalidRequest:
    return InvalidRequest(
        f"{field} is {asked!r} but '{model}' was trained with {trained!r}: a job that continues "
        "from a model keeps its LoRA shape (r, alpha, target_modules). Leave lora out to take "
        "the model's, or start a new adapter from its base model.", param=field)
