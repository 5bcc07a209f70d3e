"""Loaded at start-up by a worker started with ``slow_save_env()``: stretches checkpoint saves.

Saving a checkpoint of the tiny test model takes milliseconds, too short for a test to kill
the worker in the middle of it. This pauses every save after transformers wrote the files
into the ``.staging-*`` folder and before the completion marker and the rename, which is
exactly the state a worker killed mid-save (on a real model, seconds of writing) leaves behind.
"""

import os
import time

_SECONDS = float(os.environ.get("LORAFLEET_TEST_SLOW_SAVE_SECONDS", "0"))

if _SECONDS > 0:
    import worker.checkpoints as _checkpoints

    _write_marker = _checkpoints.write_marker

    def _slow_write_marker(path, step):  # type: ignore[no-untyped-def]
        time.sleep(_SECONDS)
        _write_marker(path, step)

    _checkpoints.write_marker = _slow_write_marker
