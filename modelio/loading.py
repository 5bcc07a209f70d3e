"""Loading a base model's pieces by name, for training and serving alike."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from shared.errors import LorafleetError


class ModelLoadError(LorafleetError):
    """A base model, its tokenizer or its LoRA targets that do not load; the job fails with it."""

    code = "model_load_failed"


def load_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` (a hub id or a local folder), with a pad token.

    A tokenizer without a pad token pads with its eos token, as the seed recipe does.

    Raises:
        ModelLoadError: the tokenizer does not load (``param="model"``).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model reference
        raise ModelLoadError(f"could not load the tokenizer of '{model}': {e}",
                             param="model") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
