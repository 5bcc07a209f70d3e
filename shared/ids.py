"""Public identifiers, shaped like OpenAI's (``file-…``, ``ftjob-…``)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """A random, URL-safe id with an OpenAI-style prefix, e.g. ``ftjob-3f9a…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, as OpenAI objects carry it."""
    return int(time.time())
