"""Objects to delete from storage once the database has let go of them: an outbox.

A deletion a user asks for (a fine-tuned model, a file) is decided in the database, and its
objects go after. The rows that say what to delete (:class:`~shared.models.StorageDeletion`)
are written in the transaction of the deletion (:func:`schedule`): from its commit on, the
thing is gone for every reader whatever the store does, and nothing is ever deleted from
storage for a deletion that did not commit. The request that committed then deletes the
objects at once (:func:`purge`); what the store did not take then (it was away, or the process
stopped) the workers' purger deletes later (:func:`purge_pending`). So a deletion is never
answered 503 once it is committed, and the bucket keeps what the database says is gone only
until the store answers again.

Deleting twice is harmless (a missing object is fine), so purgers need no lock between them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared import storage
from shared.db import session_scope
from shared.dependencies import log_failure
from shared.ids import now
from shared.models import StorageDeletion
from shared.storage.folders import delete_folder

log = logging.getLogger(__name__)

BATCH = 100  # rows a purger takes at a time


@dataclass(frozen=True)
class Deletion:
    """One row of the outbox: a committed folder's key, or one object's."""

    seq: int
    key: str
    folder: bool


def schedule(session: Session, *, folders: Iterable[str] = (), objects: Iterable[str] = ()
             ) -> list[Deletion]:
    """Note, in the caller's transaction, that these storage folders (committed by manifest,
    or a prefix of such folders) and objects are to be deleted once it commits; returns
    what to hand to :func:`purge` after the commit."""
    rows = ([StorageDeletion(key=key.rstrip("/"), folder=True, created_at=now())
             for key in folders]
            + [StorageDeletion(key=key, folder=False, created_at=now()) for key in objects])
    session.add_all(rows)
    session.flush()
    return [Deletion(r.seq, r.key, r.folder) for r in rows]


def purge(deletions: Iterable[Deletion]) -> int:
    """Delete these from storage, and their rows once they are gone; returns how many went.

    Never raises: what a store that is away (or any other failure) leaves stays in the outbox
    for :func:`purge_pending`, and is logged.
    """
    pending = list(deletions)
    store = storage.get_store()
    done: list[int] = []
    try:
        for item in pending:
            if item.folder:
                delete_folder(store, item.key)
            else:
                store.delete([item.key])
            done.append(item.seq)
    except Exception as e:  # noqa: BLE001 - the deletion stands; a purger tries again
        log_failure(log, f"{len(pending) - len(done)} storage deletions wait for the next "
                         "purge", e)
    if done:
        try:
            with session_scope() as s:
                s.execute(delete(StorageDeletion).where(StorageDeletion.seq.in_(done)))
        except Exception as e:  # noqa: BLE001 - the next purge deletes them again, harmlessly
            log_failure(log, "storage deletions done but still listed", e)
    return len(done)


def purge_pending(limit: int = BATCH) -> int:
    """Purge the oldest ``limit`` rows of the outbox (the workers run this periodically);
    returns how many went.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the outbox cannot be read (the database is away).
    """
    with session_scope() as s:
        rows = s.scalars(select(StorageDeletion).order_by(StorageDeletion.seq).limit(limit))
        pending = [Deletion(r.seq, r.key, r.folder) for r in rows]
    return purge(pending) if pending else 0
