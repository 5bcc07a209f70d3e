"""Inference requests in OpenAI's shapes: what the API parses and the engine receives.

The API parses a request with these models, resolves its ``model`` to a :class:`Target` (the
base model, the adapter folder and the prompt format of the job that trained it) for the
caller's project (see ``api/served_models.py``), and hands both to the inference engine, which
needs no database and no keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.templates import PromptFormat

MAX_STOP_SEQUENCES = 4


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
