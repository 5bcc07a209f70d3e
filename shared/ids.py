"""Public identifiers, shaped like OpenAI's (``file-…``, ``ftjob-…``)."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import PurePosixPath

# Every id we hand out (``file-…``, ``ftjob-…``, ``ftckpt-…-12``) is short and plain ASCII.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_id(prefix: str) -> str:
    """A random, URL-safe id with an OpenAI-style prefix, e.g. ``ftjob-3f9a…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, as OpenAI objects carry it."""
    return int(time.time())


def plausible_id(value: str) -> bool:
    """Whether ``value`` could be one of our ids. Anything else (NUL, surrogates, 10 kB of
    text) is answered "not found" without a query: PostgreSQL rejects NUL in text."""
    return _ID.fullmatch(value) is not None


def fine_tuned_model_name(model: str, suffix: str | None, job_id: str) -> str:
    """The name a job's adapter is served under: ``ft:<base>:<suffix>:<job id>``; a local
    base model is named by its folder's name, never its server path."""
    base = PurePosixPath(model).name if model.startswith("/") else model
    return f"ft:{base}:{suffix or ''}:{job_id}"
