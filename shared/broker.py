"""The embedded broker: kombu's filesystem transport, with whole messages only.

kombu's filesystem transport (5.7) creates a message file empty, then locks it and writes the
payload; a consumer lists the folder, moves the file away without looking at the lock and
parses what it read. When the two meet, the consumer parses an empty or partial file and the
Celery worker stops with "Unrecoverable error: JSONDecodeError" (celery/kombu#1551). Here a
message is written under a name consumers skip and renamed into place when complete (a rename
within a folder is atomic), and a message that still cannot be parsed is dropped with a warning
instead of stopping the worker: a message is only a wake-up call, and the sweeper re-sends
queued jobs that nobody took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

TRANSPORT = f"{__name__}:Transport"  # Celery's broker_transport for the embedded broker
PARTIAL_PREFIX = ".partial-"  # consumers read only files named "<stamp>_<uuid>.<queue>.msg"
STAMP_DIGITS = 16  # kombu takes messages in name order: a fixed width keeps that order by time


def message_name(queue: str, stamp_ms: int) -> str:
    """The file name of a message on ``queue`` sent at ``stamp_ms`` (monotonic milliseconds).

    kombu writes the stamp unpadded and sorts names as text, so a message stamped 1,000,000
    went before one stamped 999,999; zero-padded, name order is send order."""
    return f"{stamp_ms:0{STAMP_DIGITS}d}_{uuid.uuid4()}.{queue}.msg"


class Channel(filesystem.Channel):
    # kombu's filesystem Channel names the argument ``payload``, its base class ``message``.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Put ``payload`` on ``queue``: written in full, then renamed into the queue folder."""
        final = os.path.join(self.data_folder_out, message_name(queue, round(monotonic() * 1000)))
        partial = os.path.join(self.data_folder_out, f"{PARTIAL_PREFIX}{uuid.uuid4()}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """The next message of ``queue`` that parses; a file that does not is dropped."""
        while True:
            try:
                return super()._get(queue)
            except ValueError as exc:  # json.JSONDecodeError: kombu removed the file already
                log.warning("dropped an unreadable message from queue %s (%s); the sweeper "
                            "re-sends queued jobs that no worker took", queue, exc)


class Transport(filesystem.Transport):
    Channel = Channel
