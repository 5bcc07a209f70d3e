"""API keys: created and revoked by the operator, checked on every ``/v1`` request."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.errors import InvalidRequest, LorafleetError, NotFound
from shared.ids import new_id, now
from shared.models import ApiKey

KEY_PREFIX = "lf-"
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class Unauthorized(LorafleetError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


def _hash(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no password stretching).
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, project: str, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for ``project``; returns the row and the secret (shown once)."""
    if not PROJECT_RE.match(project):
        raise InvalidRequest("project names are 1-64 letters, digits, '_' or '-'",
                             param="project")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), project=project, name=name[:128], prefix=secret[:10],
                 key_hash=_hash(secret), created_at=now())
    session.add(row)
    session.flush()
    return row, secret


def list_keys(session: Session, project: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.seq)
    if project:
        query = query.where(ApiKey.project == project)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> None:
    if not session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                           .values(revoked_at=now())).rowcount:
        raise NotFound(f"No such active key: {key_id}", param="key_id")


def authenticate(session: Session, authorization: str | None) -> str:
    """The project of a ``Bearer`` key.

    Raises:
        Unauthorized: no key, a malformed header, or an unknown or revoked key.
    """
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'",
                           code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'")
    project = session.scalar(select(ApiKey.project).where(
        ApiKey.key_hash == _hash(key.strip()), ApiKey.revoked_at.is_(None)))
    if project is None:
        raise Unauthorized("Incorrect API key provided")
    return project
