"""The engine's own errors (both backends); ``shared.http_errors`` turns them into OpenAI's
error shape."""

from __future__ import annotations

from shared.errors import LorafleetError


class GenerationFailed(LorafleetError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class AdapterLoadFailed(LorafleetError):
    status = 500
    type = "server_error"
    code = "adapter_load_failed"


class AdapterParityFailed(LorafleetError):
    """The engine does not reproduce the tokens peft generated with the adapter when it was
    trained (its parity probe): the adapter is not served."""

    status = 422
    code = "adapter_parity_failed"

    def __init__(self, message: str):
        super().__init__(message, param="model")
