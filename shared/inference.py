"""Inference requests in OpenAI's shapes, and which model a request may use.

The API parses a request with these models, resolves its ``model`` to a :class:`Target` (the
base model, the adapter folder and the prompt format of the job that trained it) for the
caller's project, and hands both to the inference engine, which needs no database and no keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import storage
from shared.errors import ModelNotReady, NotFound
from shared.models import Job
from shared.schemas import TrainingSpec
from shared.templates import PromptFormat

MAX_STOP_SEQUENCES = 4
FINE_TUNED_PREFIX = "ft:"


# --------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are ignored, as
    OpenAI-compatible servers do; fields we cannot honour are refused (see ``_unsupported``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling. Default 1.")
    n: int | None = Field(None, ge=1, le=128, description="Choices per prompt. Default 1.")
    seed: int | None = Field(None, description="Same seed, same request: same sampled text.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    raw_prompt: bool = Field(
        False,
        description="lorafleet extension: send the prompt as is, without the adapter's prompt "
        "format and its end marker.",
    )
    logprobs: Any = None
    top_logprobs: Any = None
    echo: bool | None = None
    best_of: int | None = None
    tools: list[Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingRequest:
        for name in ("logprobs", "top_logprobs", "echo", "tools"):
            if getattr(self, name) not in (None, False, [], 0):
                raise ValueError(f"'{name}' is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("'best_of' is not supported by this server")
        return self

    @property
    def choices(self) -> int:
        return self.n or 1

    def limit(self) -> int | None:
        """The requested completion length (``max_completion_tokens`` counts for chat)."""
        return self.max_tokens


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="A prompt or a list of prompts.")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("at least one prompt")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Target(BaseModel):
    """What the engine runs for a request: resolved and authorized by the API."""

    model: str = Field(description="The name the client asked for, echoed in responses.")
    base_model: str
    adapter_path: str | None = None
    prompt_format: PromptFormat | None = None


class EngineCompletionRequest(CompletionRequest):
    target: Target


class EngineChatRequest(ChatCompletionRequest):
    target: Target


# --------------------------------------------------------------------------- models
class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(default=None,
                                description="The base model of a fine-tuned model.")


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


def list_models(session: Session, project: str) -> ModelsPublic:
    """The base models of the project's succeeded jobs, then their fine-tuned models."""
    rows = list(session.execute(
        select(Job.model, Job.fine_tuned_model, Job.finished_at, Job.created_at)
        .where(Job.project == project, Job.status == "succeeded",
               Job.fine_tuned_model.is_not(None))
        .order_by(Job.seq)
    ))
    bases: dict[str, int] = {}
    for base, _, _, created in rows:
        bases.setdefault(base, created)
    data = [ModelPublic(id=b, created=c, owned_by="lorafleet", parent=None)
            for b, c in bases.items()]
    data += [ModelPublic(id=str(name), created=finished or created, owned_by=f"org-{project}",
                         parent=base) for base, name, finished, created in rows]
    return ModelsPublic(data=data)


def get_model(session: Session, project: str, model: str) -> ModelPublic:
    """One entry of :func:`list_models`; :class:`NotFound` otherwise."""
    for entry in list_models(session, project).data:
        if entry.id == model:
            return entry
    raise _unknown(model)


def _unknown(model: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def resolve_model(session: Session, project: str, model: str) -> Target:
    """The engine target of ``model`` for ``project``.

    ``model`` is a job's ``fine_tuned_model`` (``ft:<base>:<suffix>:<job id>``) or the base
    model of one of the project's succeeded jobs.

    Raises:
        NotFound: no such model in this project.
        ModelNotReady: the name is that of a job of this project that has not succeeded
            (queued, running, failed or cancelled).
    """
    from shared.jobs import fine_tuned_model_name

    if "\x00" in model:  # no model has one, and PostgreSQL text cannot hold it
        raise _unknown(model)
    if model.startswith(FINE_TUNED_PREFIX):
        job_id = model.rsplit(":", 1)[-1]
        job = session.scalar(select(Job).where(Job.id == job_id, Job.project == project))
        if job is None:
            raise _unknown(model)
        if job.status != "succeeded":
            if model != fine_tuned_model_name(job.model, job.suffix, job.id):
                raise _unknown(model)
            raise ModelNotReady(
                f"The model '{model}' is not available: its fine-tuning job {job.id} is "
                f"{job.status}" + ("." if job.status in ("failed", "cancelled")
                                    else "; it can be used once the job has succeeded."),
                param="model")
        if job.fine_tuned_model != model or not job.adapter_dir:
            raise _unknown(model)
        spec = TrainingSpec.model_validate(job.spec)
        return Target(model=model, base_model=job.model,
                      adapter_path=str(storage.root() / job.adapter_dir),
                      prompt_format=spec.prompt_format)
    used = session.scalar(select(func.count()).select_from(Job).where(
        Job.project == project, Job.status == "succeeded", Job.model == model))
    if not used:
        raise _unknown(model)
    return Target(model=model, base_model=model)
