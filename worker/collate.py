"""Batch collation: padding-free packing (the default) or padded batches (the seed's layout).

Both collators also tell the model which positions carry a loss: ``shift_labels`` holds the
next-token targets of those positions only and ``logits_to_keep`` selects them, so the LM head
and the cross-entropy run on the response tokens alone instead of on every position. The loss
is the same sum over the same targets, so this is exact; it pays most when the loss is masked
to the response (the default), where most positions have none.

Everything a packed row's forward needs to know about its layout (sample boundaries, labeled
positions) is computed here, on the host, once per batch: the model never reads a tensor back
from the GPU to learn it (see :mod:`worker.attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, modeling_utils

from worker.attention import SAMPLE_BOUNDS, SampleBounds
from worker.last_layer import last_layer_inputs
from worker.preprocess import IGNORE_INDEX

# Whether this transformers slices hidden states by a boolean (batch, length) mask in
# ``logits_to_keep`` (``slice_logits_to_keep``, newer 5.x); older ones take 1-D indices only.
BOOLEAN_LOGITS_TO_KEEP = hasattr(modeling_utils, "slice_logits_to_keep")


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``logits_to_keep`` and ``shift_labels`` for a padded ``labels`` batch ``(batch, T)``.

    Position ``t`` predicts token ``t + 1``, so its target is ``labels[..., t + 1]``; the last
    position predicts nothing. transformers' causal-LM loss takes ``shift_labels`` as given
    (no shifting) and its Trainer counts the loss's tokens from them. Where transformers takes
    no boolean mask, the positions labeled in *any* row are kept, with ``-100`` targets where a
    row has none: the same loss, a few more LM-head rows.
    """
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    if BOOLEAN_LOGITS_TO_KEEP:
        return {"logits_to_keep": keep, "shift_labels": shifted[keep]}
    columns = keep.any(dim=0).nonzero().squeeze(1)
    return {"logits_to_keep": columns, "shift_labels": shifted[:, columns]}


class PackedCollator:
    """One row per batch: samples laid end to end, no padding.

    ``position_ids`` restart at 0 for every sample and the boundaries go along twice:
    ``cu_seq_lens_q/k`` (cumulative lengths, tensors, as flash-attention's varlen kernels take
    them) and ``sample_bounds`` (the same as Python ints, for :mod:`worker.attention`), so
    attention stays within each sample. The first label of every sample is masked: it would
    otherwise be the target of the previous sample's last token. ``logits_to_keep`` is the
    labeled positions as 1-D indices: a gather, where a boolean mask would make the GPU report
    how many positions it selects before the LM head can run.
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
            SAMPLE_BOUNDS: SampleBounds(tuple(bounds)),
        }
        if self.loss_only_where_labeled:
            targets = labels[1:] + [IGNORE_INDEX]  # position t predicts token t + 1
            rows = [t for t, target in enumerate(targets) if target != IGNORE_INDEX]
            batch["logits_to_keep"] = torch.tensor(rows, dtype=torch.long)
            batch["shift_labels"] = torch.tensor([targets[t] for t in rows], dtype=torch.long)
            if self.last_layer:
                batch.update(last_layer_inputs(rows, bounds))
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
        last_layer: also send the inputs of a last layer that runs on the labeled positions
            alone (packed rows only).
    """
    if packing:
        return PackedCollator(loss_only_where_labeled=loss_only_where_labeled,
                              last_layer=last_layer)
    return PaddedCollator(tokenizer, loss_only_where_labeled=loss_only_where_labeled)
