"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import authenticate, authenticate_async
from shared.db import get_sessionmaker


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": the commit runs before the response is sent. With the default ("request")
# it would run after, so a client's next request could miss what the previous one wrote, and a
# failed commit would follow a 200.
DbSession = Annotated[Session, Depends(get_db, scope="function")]

bearer = HTTPBearer(auto_error=False, description="An API key from `lorafleet keys create`.")


async def get_authorization(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str | None:
    """The request's ``Bearer <key>`` header, ``None`` without one (checked by the route).
    Async, so a route that needs nothing else stays off the thread pool."""
    return f"Bearer {credentials.credentials}" if credentials else None


AuthorizationDep = Annotated[str | None, Depends(get_authorization)]


def get_project(session: DbSession, authorization: AuthorizationDep) -> str:
    """The project (tenant) of the request's API key; 401 without a valid key."""
    return authenticate(session, authorization)


async def get_project_async(authorization: AuthorizationDep) -> str:
    """:func:`get_project` on the event loop, for async routes that need no session: a key
    checked within ``auth_cache_seconds`` costs no database read and no thread pool call."""
    return await authenticate_async(authorization)


SessionDep = DbSession
ProjectDep = Annotated[str, Depends(get_project)]
AsyncProjectDep = Annotated[str, Depends(get_project_async)]
