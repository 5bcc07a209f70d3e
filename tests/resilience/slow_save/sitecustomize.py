"""Loaded at start-up by a worker started with ``slow_save_env()`` or ``save_gate_env()``:
stretches or holds checkpoint saves.

Saving a checkpoint of the tiny test model takes milliseconds, too short for a test to kill
the worker in the middle of it. This pauses every save after transformers wrote the files
into the ``.staging-*`` folder and before the completion marker and the rename, which is
exactly the state a worker killed mid-save (on a real model, seconds of writing) leaves behind.

With a gate folder, the save of step N waits while ``<gate>/hold-N`` exists, after writing
``<gate>/waiting-N``: a test holds the training loop at a known step for as long as it needs,
without betting on how fast the machine is.
"""

import os
import time
from pathlib import Path

_SECONDS = float(os.environ.get("LORAFLEET_TEST_SLOW_SAVE_SECONDS", "0"))
_GATE = os.environ.get("LORAFLEET_TEST_SAVE_GATE", "")

if _SECONDS > 0 or _GATE:
    import worker.checkpoints as _checkpoints

    _write_marker = _checkpoints.write_marker

    def _slow_write_marker(path, step):  # type: ignore[no-untyped-def]
        if _GATE:
            hold = Path(_GATE) / f"hold-{step}"
            if hold.exists():
                (Path(_GATE) / f"waiting-{step}").touch()
                while hold.exists():
                    time.sleep(0.02)
        time.sleep(_SECONDS)
        _write_marker(path, step)

    _checkpoints.write_marker = _slow_write_marker
