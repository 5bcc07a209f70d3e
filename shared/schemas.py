"""Request and response models of the REST API (OpenAI's fine-tuning shapes plus extensions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.lifecycle import JobStatus
from shared.templates import PromptFormat

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies (supervised jobs)
MethodType = Literal["supervised", "dpo"]
# TRL's DPO losses that a job may name (TRL's `sigmoid` is the DPO paper's).
LossType = Literal["sigmoid", "ipo", "hinge", "sigmoid_norm"]


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


class DpoHyperparameters(OpenAIHyperparameters):
    beta: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] | None = None


class SupervisedMethod(Strict):
    hyperparameters: OpenAIHyperparameters | None = None


class DpoMethod(Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(Strict):
    """OpenAI's ``method``: ``{"type": "supervised" | "dpo", "<type>": {"hyperparameters"}}``."""

    type: MethodType = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _own_settings(self) -> Method:
        for name in ("supervised", "dpo"):
            if name != self.type and getattr(self, name) is not None:
                raise ValueError(f"'{name}' settings apply to type '{name}', and the type is "
                                 f"'{self.type}'")
        return self

    def hyperparameters(self) -> OpenAIHyperparameters | None:
        """The hyperparameters given under the method's own key."""
        own: SupervisedMethod | DpoMethod | None = getattr(self, self.type)
        return own.hyperparameters if own is not None else None


class WandbIntegration(Strict):
    """Where a job's run goes in Weights & Biases (OpenAI's ``integrations[].wandb``)."""

    project: str = Field(..., min_length=1, max_length=128)
    name: str | None = Field(None, max_length=128)
    entity: str | None = Field(None, max_length=128)
    tags: list[str] | None = Field(None, max_length=50)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str] | None) -> list[str] | None:
        for tag in v or []:
            if not tag or len(tag) > 64:
                raise ValueError("tags are 1-64 characters")
        return v


class Integration(Strict):
    """One of a job's integrations; ``wandb`` is the one there is (as at OpenAI)."""

    type: Literal["wandb"]
    wandb: WandbIntegration


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
    integrations: list[Integration] | None = Field(None, max_length=1)

    # --- extensions -----------------------------------------------------------------
    lora: LoraSpec = Field(default_factory=LoraSpec)
    prompt_format: PromptFormat | Literal["dolly", "phi2-qa", "chat"] | None = Field(
        None,
        description="How records become text. Unset: 'chat' for a chat file (the base model's "
        "chat template), else 'dolly'.",
    )
    max_length: int = Field(512, ge=16)
    max_steps: int | None = Field(None, ge=1)
    n_epochs: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_tokens_per_batch: int | None = Field(
        None,
        ge=16,
        le=1_048_576,
        description="Fill each batch with examples up to this many tokens instead of a fixed "
        "count (needs packing; at least max_length). Unset, with batch_size unset too: 16384 "
        "on a GPU worker, batches of 4 examples on a CPU worker.",
    )
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
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Stop once this many evaluations in a row (one per checkpoint) did not "
        "lower the best validation loss; the job delivers the best checkpoint's adapter. "
        "Needs a validation_file.",
    )
    early_stopping_threshold: float | None = Field(
        None,
        ge=0,
        description="The least decrease of the validation loss that counts as an improvement "
        "(default 0). Needs early_stopping_patience.",
    )
    loss_type: LossType | None = Field(
        None,
        description="DPO jobs: TRL's preference loss, 'sigmoid' (the DPO paper's, the default), "
        "'ipo', 'hinge' or 'sigmoid_norm' (sigmoid on length-normalised log-ratios).",
    )
    rpo_alpha: float | None = Field(
        None,
        ge=0,
        le=100,
        description="DPO jobs: the weight of an added supervised loss on the preferred answers "
        "(RPO; TRL's 'sft' loss term). Unset: none.",
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

    @property
    def method_type(self) -> MethodType:
        return self.method.type if self.method is not None else "supervised"

    def openai_hyperparameters(self) -> OpenAIHyperparameters:
        """The top-level ``hyperparameters`` (OpenAI's older field), else the method's."""
        hp = self.hyperparameters
        if hp is None and self.method is not None:
            hp = self.method.hyperparameters()
        return hp or OpenAIHyperparameters()


class DpoSpec(BaseModel):
    """How a DPO job weighs its preference pairs (TRL's ``DPOConfig`` fields)."""

    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    rpo_alpha: float | None = None


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
    # "auto": the worker's default (a token budget on CUDA, batch_size elsewhere).
    max_tokens_per_batch: int | Literal["auto"] | None = None
    gradient_checkpointing: bool = False
    quantization: Literal["4bit"] | None = None
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    integrations: list[Integration] = Field(default_factory=list)
    # Continued training: the fine-tuned model or checkpoint the job starts from, as the
    # request named it, and its adapter's folder relative to the storage folder.
    initial_model: str | None = None
    initial_adapter: str | None = None
    method: MethodType = "supervised"
    dpo: DpoSpec | None = None  # DPO jobs only


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


class EvaluationScores(BaseModel):
    """One model's scores on a job's validation records (means over the examples)."""

    rouge1: float = Field(description="ROUGE-1 F1 (stemmed) against the record's response.")
    rouge2: float = Field(description="ROUGE-2 F1 (stemmed).")
    rougeL: float = Field(description="ROUGE-L F1 (stemmed).")
    exact_match: float = Field(
        description="Share of answers equal to the response, whitespace aside.")


class Evaluation(BaseModel):
    """The quality card of a job with a validation file: the base model and the fine-tuned
    model, each given the first validation records' prompts in the job's prompt format and
    decoding greedily."""

    base: EvaluationScores
    fine_tuned: EvaluationScores
    examples: int = Field(description="Validation records scored.")
    max_new_tokens: int = Field(description="The most tokens generated per answer.")


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
    integrations: list[Integration] = Field(default_factory=list)
    user_provided_suffix: str | None = None
    # extensions
    lora: LoraSpec
    prompt_format: PromptFormat
    max_length: int
    max_steps: int | None = None
    n_epochs: float | None = None
    batch_size: int
    gradient_accumulation_steps: int
    max_tokens_per_batch: int | Literal["auto"] | None = None
    learning_rate: float
    train_on_inputs: bool
    packing: bool
    gradient_checkpointing: bool = False
    quantization: Literal["4bit"] | None = None
    early_stopping_patience: int | None = None
    early_stopping_threshold: float | None = None
    loss_type: LossType | None = None
    rpo_alpha: float | None = None
    progress: Progress | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    dataset: DatasetStats | None = None
    attempt: int
    resumed_from_step: int | None = None
    last_good_checkpoint_step: int | None = None
    adapter_path: str | None = Field(
        None, description="Where the final adapter lies (PEFT layout, plus lorafleet.json), as "
        "a storage URL: a local path on file:// storage, s3://bucket/prefix/... on S3. Its "
        "folder holds lorafleet-complete.json, the manifest of its files with their sha256.")
    initial_model: str | None = Field(
        None, description="The fine-tuned model or checkpoint this job continued training from.")
    fine_tuned_model_deleted_at: int | None = Field(
        None, description="When the fine-tuned model was deleted (its name stays, its files "
        "are gone).")
    evaluation: Evaluation | None = Field(
        None, description="Base vs fine-tuned scores on the validation records, once the job "
        "succeeded (jobs with a validation file).")


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
