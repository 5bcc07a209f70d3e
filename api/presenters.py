"""The public shapes of files, jobs, events and checkpoints: OpenAI's objects, our extensions."""

from __future__ import annotations

from shared import methods, storage
from shared.ids import fine_tuned_model_name
from shared.lifecycle import JobStatus
from shared.models import Checkpoint, File, Job, JobEvent
from shared.schemas import (
    CheckpointPublic,
    DatasetStats,
    ErrorInfo,
    Evaluation,
    EventPublic,
    FilePublic,
    JobPublic,
    Progress,
    TrainingSpec,
)


def file_public(row: File) -> FilePublic:
    return FilePublic(id=row.id, bytes=row.bytes, created_at=row.created_at,
                      filename=row.filename, purpose=row.purpose, status=row.status,
                      line_count=row.line_count, record_format=row.record_format)


def job_public(job: Job) -> JobPublic:
    spec = TrainingSpec.model_validate(job.spec)
    hp = {
        "n_epochs": spec.n_epochs if spec.max_steps is None else "auto",
        "batch_size": spec.batch_size,
        "learning_rate_multiplier": spec.learning_rate / methods.base_learning_rate(spec.method),
    }
    # OpenAI's method object, with what each "auto" resolved to.
    own = {**hp, "beta": spec.dpo.beta} if spec.dpo is not None else hp
    return JobPublic(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=f"org-{job.project}",
        status=job.status,  # type: ignore[arg-type]
        training_file=job.training_file,
        validation_file=job.validation_file,
        result_files=list(job.result_files or []),
        hyperparameters=hp,
        method={"type": spec.method, spec.method: {"hyperparameters": own}},
        trained_tokens=job.trained_tokens,
        seed=job.seed,
        # A projection of the running attempt's pace: none while the job does not run.
        estimated_finish=job.estimated_finish if job.status == JobStatus.RUNNING else None,
        metadata=job.user_metadata,
        error=ErrorInfo(**job.error) if job.error else None,
        user_provided_suffix=job.suffix,
        lora=spec.lora,
        prompt_format=spec.prompt_format,
        max_length=spec.max_length,
        max_steps=spec.max_steps,
        n_epochs=spec.n_epochs if spec.max_steps is None else None,
        batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        max_tokens_per_batch=spec.max_tokens_per_batch,
        learning_rate=spec.learning_rate,
        train_on_inputs=spec.train_on_inputs,
        packing=spec.packing,
        gradient_checkpointing=spec.gradient_checkpointing,
        quantization=spec.quantization,
        early_stopping_patience=spec.early_stopping_patience,
        early_stopping_threshold=(spec.early_stopping_threshold
                                  if spec.early_stopping_patience else None),
        integrations=spec.integrations,
        loss_type=spec.dpo.loss_type if spec.dpo is not None else None,
        rpo_alpha=spec.dpo.rpo_alpha if spec.dpo is not None else None,
        progress=Progress(**job.progress) if job.progress else None,
        trainable_parameters=job.trainable_parameters,
        total_parameters=job.total_parameters,
        dataset=DatasetStats(**job.dataset_stats) if job.dataset_stats else None,
        attempt=job.attempt,
        resumed_from_step=job.resumed_from_step,
        last_good_checkpoint_step=job.last_good_step,
        adapter_path=storage.get_store().url(job.adapter_dir) if job.adapter_dir else None,
        evaluation=Evaluation.model_validate(job.evaluation) if job.evaluation else None,
        initial_model=spec.initial_model,
        fine_tuned_model_deleted_at=job.fine_tuned_model_deleted_at,
    )


def event_public(event: JobEvent) -> EventPublic:
    return EventPublic(
        id=f"ftevent-{event.seq}",
        created_at=event.created_at,
        level=event.level,  # type: ignore[arg-type]
        message=event.message,
        type=event.type,  # type: ignore[arg-type]
        data=event.data,
    )


def checkpoint_public(ckpt: Checkpoint, job: Job) -> CheckpointPublic:
    name = fine_tuned_model_name(job.model, job.suffix, job.id)
    return CheckpointPublic(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=f"{name}:ckpt-step-{ckpt.step_number}",
        fine_tuning_job_id=job.id,
        step_number=ckpt.step_number,
        metrics=ckpt.metrics,
        path=storage.get_store().url(ckpt.path),
    )


