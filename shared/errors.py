"""Domain errors. Raised below the API and mapped to HTTP responses in one place
(``shared/http_errors.py``)."""

from __future__ import annotations


class LorafleetError(Exception):
    """Base class: ``status`` is the HTTP status the API answers with, ``param`` the bad field."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFound(LorafleetError):
    status = 404
    code = "not_found"


class Conflict(LorafleetError):
    status = 409
    code = "conflict"


class InvalidDataset(LorafleetError):
    """A training or validation file that cannot be used; the message names the line."""

    code = "invalid_file"


class PayloadTooLarge(LorafleetError):
    status = 413
    code = "payload_too_large"


class InvalidRequest(LorafleetError):
    code = "invalid_value"


class ValidationFailed(LorafleetError):
    """A request field outside the operator's limits (same status as a schema error)."""

    status = 422
    code = "invalid_value"


class ModelNotReady(LorafleetError):
    """A fine-tuned model whose job has not succeeded (yet): it cannot be served."""

    status = 409
    code = "model_not_ready"


class ContextLengthExceeded(LorafleetError):
    code = "context_length_exceeded"


class Overloaded(LorafleetError):
    """Too many requests wait already; the client should retry after ``retry_after`` s."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class ServiceUnavailable(LorafleetError):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class DependencyUnavailable(ServiceUnavailable):
    """A part the service depends on does not answer (the database, the broker, the object
    store): the request may succeed if retried after ``retry_after`` s; nothing was written."""

    code = "service_unavailable"
    dependency = "dependency"

    def __init__(self, message: str, *, retry_after: int = 5, param: str | None = None):
        super().__init__(message, param=param)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class DatabaseUnavailable(DependencyUnavailable):
    code = "database_unavailable"
    dependency = "database"


class BrokerUnavailable(DependencyUnavailable):
    code = "broker_unavailable"
    dependency = "broker"


class StorageUnavailable(DependencyUnavailable):
    """The storage backend (the object store, or the shared folder) cannot be reached."""

    code = "storage_unavailable"
    dependency = "storage"
