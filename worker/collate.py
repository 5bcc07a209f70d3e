"""Batch collation: padding-free packing (the default) or padded batches (the seed's layout).

Both collators also tell the model which positions carry a loss: ``shift_labels`` holds the
next-token targets of those positions only and ``logits_to_keep`` (a boolean mask) selects
them, so the LM head and the cross-entropy run on the response tokens alone instead of on
every position. The loss is the same sum over the same targets, so this is exact; it pays
most when the loss is masked to the response (the default), where most positions have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq

from worker.last_layer import LOSS_POSITIONS
from worker.preprocess import IGNORE_INDEX


def loss_positions(labels: torch.Tensor, *, for_last_layer: bool = False
                   ) -> dict[str, torch.Tensor]:
    """``logits_to_keep`` and ``shift_labels`` for a ``labels`` batch (any leading shape).

    Position ``t`` predicts token ``t + 1``, so its target is ``labels[..., t + 1]``; the last
    position predicts nothing. transformers' causal-LM loss takes ``shift_labels`` as given
    (no shifting) and its Trainer counts the loss's tokens from them. ``for_last_layer`` also
    sends the mask as ``loss_positions`` (see :mod:`worker.last_layer`).
    """
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    out = {"logits_to_keep": keep, "shift_labels": shifted[keep]}
    if for_last_layer:
        out[LOSS_POSITIONS] = keep
    return out


class PackedCollator:
    """One row per batch: samples laid end to end, no padding.

    ``position_ids`` restart at 0 for every sample and ``cu_seq_lens_q/k`` (cumulative
    lengths, as flash-attention's varlen kernels take them) mark the boundaries, so attention
    stays within each sample (see :mod:`worker.attention`). The first label of every sample is
    masked: it would otherwise be the target of the previous sample's last token.
    """

    def __init__(self, *, loss_only_where_labeled: bool = True, last_layer: bool = False):
        self.loss_only_where_labeled = loss_only_where_labeled
        self.last_layer = last_layer

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for f in features:
            seq = list(f["input_ids"])
            lab = list(f["labels"]) if "labels" in f else seq
            n = len(seq)
            ids += seq
            labels.append(IGNORE_INDEX)
            labels += lab[1:]
            positions += range(n)
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        if self.loss_only_where_labeled:
            batch.update(loss_positions(batch["labels"], for_last_layer=self.last_layer))
        return batch


class PaddedCollator:
    """Pads to the longest sample of the batch (labels with -100) and builds the mask."""

    def __init__(self, tokenizer: Any, *, loss_only_where_labeled: bool = True):
        self._pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX,
                                           padding=True)
        self.loss_only_where_labeled = loss_only_where_labeled

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self._pad(list(features)))
        if self.loss_only_where_labeled:
            batch.update(loss_positions(batch["labels"]))
        return batch


def make_collator(tokenizer: Any, *, packing: bool, loss_only_where_labeled: bool = True,
                  last_layer: bool = False) -> Any:
    """The collator of a job: packed rows with ``packing``, else padded batches.

    Args:
        loss_only_where_labeled: run the LM head and the loss on labeled positions only
            (exact; off only to measure what it saves).
        last_layer: also send ``loss_positions`` for a model whose last layer runs on them
            alone (packed rows only).
    """
    if packing:
        return PackedCollator(loss_only_where_labeled=loss_only_where_labeled,
                              last_layer=last_layer)
    return PaddedCollator(tokenizer, loss_only_where_labeled=loss_only_where_labeled)
