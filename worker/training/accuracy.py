"""Token accuracy from the logits the loss already used: no second forward pass.

The share of target tokens (labels other than -100) whose most likely prediction, the argmax
of the logits, is the target, as OpenAI's ``mean_token_accuracy`` metrics report it. The
collators usually have the LM head run on the labeled positions only (``logits_to_keep`` with
``shift_labels``): the logits are then already the targets' rows, in the targets' order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from worker.preprocess import IGNORE_INDEX


class TokenAccuracy:
    """Counts right and scored target tokens over several batches, on the device: no value is
    read back to the host before :meth:`take` (the Trainer reads the loss then anyway)."""

    def __init__(self) -> None:
        self.correct: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        """Count one batch: ``logits`` of the model's output for ``inputs``, the batch the
        collator made. A layout it does not recognise is left out rather than guessed."""
        with torch.no_grad():
            targets = inputs.get("shift_labels")
            if targets is not None:
                # The LM head ran on the loss positions: one row of logits per target, in the
                # same order, whatever the batch layout ((1, n) packed, (n,) or (B, C) padded).
                predicted = logits.argmax(dim=-1).reshape(-1)
                targets = targets.reshape(-1)
                if predicted.numel() != targets.numel():
                    return
            else:
                labels = inputs.get("labels")
                if labels is None:
                    return
                # Logits at every position: position t predicts token t + 1.
                predicted = logits[..., :-1, :].argmax(dim=-1)
                targets = labels[..., 1:]
                if predicted.shape != targets.shape:
                    return
            scored = targets != IGNORE_INDEX
            correct = (predicted == targets).logical_and(scored).sum()
            total = scored.sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.total = total if self.total is None else self.total + total

    def take(self) -> float | None:
        """The share counted since the last call (None if no target was scored), and reset."""
        correct, total = self.correct, self.total
        self.correct = self.total = None
        if correct is None or total is None:
            return None
        scored = int(total.item())
        return int(correct.item()) / scored if scored else None
