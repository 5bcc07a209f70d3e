"""Loaded at start-up by a worker started with ``slow_save_env()`` or ``save_gate_env()``:
stretches or holds checkpoint saves.

Saving a checkpoint of the tiny test model takes milliseconds, too short for a test to kill
the worker in the middle of it. This pauses every save after transformers wrote the files
into the ``.staging-*`` folder and before the completion marker and the rename, which is
exactly the state a worker killed mid-save (on a real model, seconds of writing) leaves behind.

With a gate folder, the save of step N waits while ``<gate>/hold-N`` exists, after writing
``<gate>/waiting-N``: a test holds the training loop at a known step for as long as it needs,
without betting on how fast the machine is.

With a commit gate folder, the commit of checkpoint N to storage waits while
``<gate>/hold-commit-N`` exists, after writing ``<gate>/waiting-commit-N``: its files are
uploaded then, its manifest not yet written (what a worker killed mid-upload leaves).
"""

import os
import time
from pathlib import Path

_SECONDS = float(os.environ.get("LORAFLEET_TEST_SLOW_SAVE_SECONDS", "0"))
_GATE = os.environ.get("LORAFLEET_TEST_SAVE_GATE", "")
_COMMIT_GATE = os.environ.get("LORAFLEET_TEST_COMMIT_GATE", "")


def _hold(gate: str, name: str) -> None:
    hold = Path(gate) / f"hold-{name}"
    if hold.exists():
        (Path(gate) / f"waiting-{name}").touch()
        while hold.exists():
            time.sleep(0.02)

if _SECONDS > 0 or _GATE:
    import worker.checkpoints as _checkpoints

    _write_marker = _checkpoints.write_marker

    def _slow_write_marker(path, step):  # type: ignore[no-untyped-def]
        if _GATE:
            _hold(_GATE, str(step))
        time.sleep(_SECONDS)
        _write_marker(path, step)

    _checkpoints.write_marker = _slow_write_marker

if _COMMIT_GATE:
    import shared.storage.folders as _folders

    _commit_folder = _folders.commit_folder

    def _gated_commit_folder(store, source, folder, *, meta=None, before_commit=None,  # type: ignore[no-untyped-def]
                             **kwargs):
        step = (meta or {}).get("step")

        def gate():  # type: ignore[no-untyped-def]
            if step is not None:
                _hold(_COMMIT_GATE, f"commit-{step}")
            if before_commit is not None:
                before_commit()

        return _commit_folder(store, source, folder, meta=meta, before_commit=gate, **kwargs)

    _folders.commit_folder = _gated_commit_folder
