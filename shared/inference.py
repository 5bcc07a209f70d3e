"""Inference requests in OpenAI's shapes: what the API parses and the engine receives.

The API parses a request with these models, resolves its ``model`` to a :class:`Target` (the
base model, the adapter folder and the prompt format of the job that trained it) for the
caller's project (see ``api/served_models.py``), and hands both to the inference engine, which
needs no database and no keys.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.request_fields import (
    EXTENSIONS,
    REFUSED_CHAT,
    REFUSED_COMPLETION,
    WITHOUT_EFFECT,
    Refusal,
    check_fields,
)
from shared.templates import PromptFormat

MAX_STOP_SEQUENCES = 4


# --------------------------------------------------------------------------- requests
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        None, description="Accepted; lorafleet adds no obfuscation field to its chunks.")


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. Every field the openai SDK sends is
    honoured, or refused by name (``shared.request_fields``); unknown fields are refused."""

    model_config = ConfigDict(extra="allow")  # checked by _fields, below

    _refused: ClassVar[dict[str, Refusal]] = {}

    model: str = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling. Default 1.")
    n: int | None = Field(None, ge=1, le=128, description="Choices per prompt. Default 1.")
    seed: int | None = Field(None, description="Same seed, same request: same sampled text.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = Field(
        None, description="Token id -> a bias from -100 to 100 added to its logit.")
    user: str | None = None
    safety_identifier: str | None = None
    raw_prompt: bool = Field(
        False,
        description="lorafleet extension: send the prompt as is, without the adapter's prompt "
        "format and its end marker.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, data: Any) -> Any:
        check_fields(data, {**cls.model_fields, **dict.fromkeys(EXTENSIONS),
                            **dict.fromkeys(WITHOUT_EFFECT)}, cls._refused)
        return data

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

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("biases go from -100 to 100")
        if v and any(t < 0 for t in v):
            raise ValueError("token ids are not negative")
        return v

    @property
    def choices(self) -> int:
        return self.n or 1

    def limit(self) -> int | None:
        """The requested completion length (``max_completion_tokens`` counts for chat)."""
        return self.max_tokens

    @property
    def echo_prompt(self) -> bool:
        """Whether the answer starts with the prompt (completions' ``echo``)."""
        return False

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's logprobs list; None: no logprobs."""
        return None


TokenPrompt = list[int]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    _refused: ClassVar[dict[str, Refusal]] = REFUSED_COMPLETION

    prompt: str | list[str] | TokenPrompt | list[TokenPrompt] = Field(
        description="A prompt, a list of prompts, or prompts as token ids.")
    max_tokens: int | None = Field(
        None, ge=0, description="Most tokens to generate per choice (0: with echo, score the "
        "prompt only).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Alternatives listed per token (0-20).")
    echo: bool | None = Field(None, description="Start the answer with the prompt (and its "
                              "tokens' logprobs).")
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("at least one prompt")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a prompt of token ids has at least one token")
        return v

    @model_validator(mode="after")
    def _zero_tokens(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing: send echo: true to score the "
                             "prompt")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @property
    def echo_prompt(self) -> bool:
        return bool(self.echo)

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments, as a JSON string.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    _refused: ClassVar[dict[str, Refusal]] = REFUSED_CHAT

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="The reply's tokens with their logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="Alternatives listed per token (0-20).")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Refused unless they ask for nothing (shared.request_fields): declared so that the
    # engine gets them as sent.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', "
                                 "which is not one of the tools")
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may be tool calls (tools given, and not ``tool_choice: none``)."""
        return bool(self.tools) and self.tool_choice != "none"


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
