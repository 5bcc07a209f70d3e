"""The error answers every ``/v1`` route documents in its OpenAPI schema; the handlers that
send them are in ``shared/http_errors.py``."""

from __future__ import annotations

from typing import Any

from shared.http_errors import ErrorResponse

# Documented on every /v1 route, so clients (and schema checks) know the error shape; this
# also replaces FastAPI's default 422 schema, which is not what we send.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request or data"),
        (401, "Missing or invalid API key"),
        (404, "No such object in this project"),
        (409, "Conflicts with the object's state"),
        (413, "Request body over the operator's limit"),
        (422, "A field is invalid or over the operator's limit"),
        (429, "Over a per-project limit; see Retry-After"),
        (503, "The database, the broker or the storage is not answering; see Retry-After"),
    ]
}
