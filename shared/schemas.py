"""Request and response models of the REST API (OpenAI's fine-tuning shapes plus extensions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.lifecycle import JobStatus
from shared.templates import PromptFormat

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies


class Strict(BaseModel):
    # Python's JSON parser takes NaN and Infinity; no request field means either.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- requests
class LoraSpec(Strict):
    """LoRA adapter shape; converted to ``peft.LoraConfig`` on the worker."""

    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scale: weights are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names to adapt. Default: the architecture's attention and MLP "
        "projections.",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not name or not all(c.isalnum() or c in "._-" for c in name) or len(name) > 100:
                raise ValueError(f"'{name}' is not a module name")
        return v


class OpenAIHyperparameters(Strict):
    # Bounds sit on the number branch: on the whole union they would be applied to "auto".
    n_epochs: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None


class SupervisedMethod(Strict):
    hyperparameters: OpenAIHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class JobCreate(Strict):
    """``POST /v1/fine_tuning/jobs``. OpenAI's fields, then lorafleet's extensions."""

    model: str = Field(..., min_length=1, max_length=1000)
    training_file: str = Field(..., min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0)

    # --- extensions -----------------------------------------------------------------
    lora: LoraSpec = Field(default_factory=LoraSpec)
    prompt_format: PromptFormat | Literal["dolly", "phi2-qa", "chat"] = "dolly"
    max_length: int = Field(512, ge=16)
    max_steps: int | None = Field(None, ge=1)
    n_epochs: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1)
    warmup: float = Field(
        0, ge=0, description="Warm-up: a fraction of the steps if < 1, else a step count."
    )
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(10, ge=1)
    train_on_inputs: bool = Field(
        False, description="True: loss on every token (labels = input_ids, the seed's recipe)."
    )
    packing: bool = Field(
        True,
        description="Lay a batch's samples end to end with no padding; attention stays within "
        "each sample, so the loss is the padded batch's. False: padded batches (the seed's).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more time."
    )
    quantization: Literal["4bit"] | None = Field(
        None,
        description="'4bit': load the base model in 4-bit NF4 (QLoRA; needs a CUDA worker with "
        "bitsandbytes, else the job fails saying so).",
    )
    column_map: dict[str, str] | None = Field(
        None, description="Our column name → yours, e.g. {'dialogue': 'conversation'}."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for k, val in (v or {}).items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError("metadata keys are at most 64 characters, values 512")
        return v

    @field_validator("column_map")
    @classmethod
    def _column_map(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for ours, theirs in (v or {}).items():
            if not ours or not theirs or len(ours) > 100 or len(theirs) > 100:
                raise ValueError("column names must be 1-100 characters")
        return v

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> JobCreate:
        if self.max_steps is not None and self.n_epochs is not None:
            raise ValueError("give max_steps or n_epochs, not both")
        return self

    def openai_hyperparameters(self) -> OpenAIHyperparameters:
        hp = self.hyperparameters
        if hp is None and self.method and self.method.supervised:
            hp = self.method.supervised.hyperparameters
        return hp or OpenAIHyperparameters()


class TrainingSpec(BaseModel):
    """Everything a worker needs to run a job; stored on the job row as JSON."""

    model: str
    training_file: str
    validation_file: str | None = None
    lora: LoraSpec
    prompt_format: PromptFormat
    record_shape: str | None = None
    column_map: dict[str, str] | None = None
    max_length: int
    max_steps: int | None = None
    n_epochs: float
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup: float
    save_steps: int
    logging_steps: int
    train_on_inputs: bool
    packing: bool
    seed: int
    # Defaulted, so that specs stored before these options existed still validate.
    gradient_checkpointing: bool = False
    quantization: Literal["4bit"] | None = None


# --------------------------------------------------------------------------- responses
class ErrorInfo(BaseModel):
    code: str | None = None
    message: str
    param: str | None = None


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    line_count: int | None = None
    record_format: str | None = None


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class DatasetStats(BaseModel):
    examples: int
    dropped_too_long: int
    validation_examples: int | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: JobStatus
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = Field(default_factory=list)
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    trained_tokens: int | None = None
    seed: int
    estimated_finish: int | None = None
    metadata: dict[str, str] | None = None
    error: ErrorInfo | None = None
    integrations: list[Any] = Field(default_factory=list)
    user_provided_suffix: str | None = None
    # extensions
    lora: LoraSpec
    prompt_format: PromptFormat
    max_length: int
    max_steps: int | None = None
    n_epochs: float | None = None
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    train_on_inputs: bool
    packing: bool
    gradient_checkpointing: bool = False
    quantization: Literal["4bit"] | None = None
    progress: Progress | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    dataset: DatasetStats | None = None
    attempt: int
    resumed_from_step: int | None = None
    last_good_checkpoint_step: int | None = None
    adapter_path: str | None = None


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    path: str


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
