"""The training methods a job may ask for (OpenAI's ``method.type``), as the API and the job
object know them: the records each trains on, what ``learning_rate_multiplier`` multiplies, and
the request fields that only apply to one of them. How each trains is the worker's
(``worker.training.methods``).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import preference
from shared.errors import InvalidRequest
from shared.schemas import BASE_LEARNING_RATE


@dataclass(frozen=True)
class MethodFacts:
    """What the API checks and reports of one method."""

    base_learning_rate: float  # what learning_rate_multiplier multiplies
    # The record format its files must have, and what a line of it looks like; None: any
    # format but those other methods claim.
    record_format: str | None
    record_line: str | None
    # Request fields (extensions) that this method does not use.
    unused_fields: tuple[str, ...]
    # Request fields that only this method uses.
    own_fields: tuple[str, ...] = ()
    # Whether a job may render its records with a custom template (a preference pair's two
    # answers are its outputs, which templates of named columns cannot tell apart).
    custom_format: bool = True


METHODS: dict[str, MethodFacts] = {
    "supervised": MethodFacts(base_learning_rate=BASE_LEARNING_RATE, record_format=None,
                              record_line=None, unused_fields=()),
    # DPO with LoRA moves the policy away from its reference fast: a lower base rate than
    # supervised training (TRL's own default, 1e-6, is for full fine-tuning).
    "dpo": MethodFacts(
        base_learning_rate=1e-4, record_format=preference.SHAPE, record_line=preference.LINE,
        unused_fields=("column_map", "max_tokens_per_batch", "train_on_inputs", "packing"),
        own_fields=("loss_type", "rpo_alpha"), custom_format=False),
}
CLAIMED = {m.record_format for m in METHODS.values() if m.record_format is not None}
DEFAULT_BETA = 0.1  # TRL's and OpenAI's


def base_learning_rate(method: str) -> float:
    return METHODS[method].base_learning_rate


def check_file(method: str, record_format: str | None, file_id: str, param: str) -> None:
    """Refuse a file whose records the method cannot train on.

    Raises:
        InvalidRequest: naming ``param`` when the file is the one to change (a DPO job on chat
            records), ``method`` when the method is (a supervised job on preference pairs).
    """
    facts = METHODS[method]
    wanted = facts.record_format
    if wanted is not None and record_format != wanted:
        raise InvalidRequest(
            f"{param}: file {file_id} holds {record_format or 'unknown'} records; a {method} "
            f"job trains on {wanted} records, lines of {facts.record_line}", param=param)
    if wanted is None and record_format in CLAIMED:
        owner = next(name for name, m in METHODS.items() if m.record_format == record_format)
        raise InvalidRequest(
            f"{param}: file {file_id} holds {record_format} records, which a {method} job "
            f"cannot learn from: train on it with method {{\"type\": \"{owner}\"}}",
            param="method")
