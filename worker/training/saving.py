"""How every method's Trainer saves a checkpoint: staged, marked complete, fenced, then renamed
into place, so that ``checkpoint-N`` only ever exists complete.

transformers writes ``checkpoint-N`` in place, so a kill mid-save leaves a folder that looks
like a checkpoint (transformers#35782). :class:`AtomicCheckpoints` is mixed into the Trainer
class of each training method (``SupervisedTrainer``, ``PreferenceTrainer``), ahead of the
library's Trainer, so that there is one save path whatever the method.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from worker.checkpoints import write_marker


class AtomicCheckpoints:
    """A mixin for a ``transformers.Trainer`` subclass: each checkpoint is written in a staging
    folder and renamed into place when complete."""

    _staging: str | None = None
    # Raises StopTraining once this worker's lease is gone: checked before a checkpoint is
    # moved into place, so a worker that was frozen or cut off never overwrites the new owner's.
    fence: Callable[[], None] | None = None

    def _get_output_dir(self, trial):  # type: ignore[no-untyped-def]
        return self._staging or super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        root = super()._get_output_dir(trial)  # type: ignore[misc]
        os.makedirs(root, exist_ok=True)
        self._staging = tempfile.mkdtemp(dir=root, prefix=".staging-")
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            name = f"checkpoint-{self.state.global_step}"  # type: ignore[attr-defined]
            staged = Path(self._staging) / name
            write_marker(staged, self.state.global_step)  # type: ignore[attr-defined]
            if self.fence is not None:
                self.fence()
            final = Path(root) / name
            if final.exists():  # the same step saved by an earlier attempt
                trash = Path(root) / f".trash-{name}-{time.time_ns()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staged, final)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
