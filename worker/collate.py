"""Batch collation: padded batches (the default) or padding-free packing."""

from __future__ import annotations

from typing import Any

from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from worker.preprocess import IGNORE_INDEX


def make_collator(tokenizer: Any, *, packing: bool) -> Any:
    """Padding collator, or, with ``packing``, one long row per batch whose ``position_ids``
    restart at every sample: transformers then masks attention per sample (no cross-talk)."""
    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    # Pads input_ids with the pad token, labels with -100, and builds the attention mask.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
