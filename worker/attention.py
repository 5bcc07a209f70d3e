"""Attention for packed rows: each sample attends to itself only, at the cost of its own length.

transformers handles a packed row under ``sdpa`` by building one dense ``T x T`` mask from the
``position_ids`` (T = all the batch's tokens) and running attention over all of it: correct,
but the work grows with the square of the *batch's* length instead of each sample's. Here the
row is cut at the samples' boundaries and each piece runs causal SDPA alone (flash kernels on
CPU and GPU, no mask to build or read).

The boundaries arrive as :class:`SampleBounds`, Python ints the packing collator computed on the
host. ``cu_seq_lens_q`` holds the same numbers, but as a tensor it is on the GPU by the time the
model runs (flash-attention's varlen kernels want it there), and reading it back in every layer
(and again in every recompute under gradient checkpointing) would be a GPU→CPU round trip that
stalls the launch queue. A ``SampleBounds`` is no tensor, no mapping and no sequence, so the
Trainer and accelerate hand it to the model untouched (they move tensors and walk containers),
and transformers passes it, like any extra batch entry, down every layer's keyword arguments to
this function. It travels inside its own batch, so prefetched batches (gradient accumulation,
data-loader workers) can never mix up whose boundaries are whose, as a per-step global could.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)

PACKED_SDPA = "lorafleet_packed_sdpa"
# The batch entry (and so the keyword argument of every layer) that carries a SampleBounds.
SAMPLE_BOUNDS = "sample_bounds"


@dataclass(frozen=True)
class SampleBounds:
    """Where the samples of a packed row start and end: sample ``i`` is
    ``cuts[i]:cuts[i + 1]`` (``cuts[0] == 0``, the last is the row's length)."""

    cuts: tuple[int, ...]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: per-sample causal SDPA over a packed row.

    ``query``/``key``/``value`` are ``(batch, heads, tokens, head_dim)``; the boundaries come
    as ``sample_bounds`` (a :class:`SampleBounds`). Without them (an unpacked batch,
    generation) this is plain ``sdpa``.
    """
    bounds: SampleBounds | None = kwargs.get(SAMPLE_BOUNDS)
    cu_seq_lens: torch.Tensor | None = kwargs.get("cu_seq_lens_q")
    one_row = query.shape[0] == 1 and attention_mask is None
    if one_row and bounds is not None:
        cuts = list(bounds.cuts)
    elif one_row and cu_seq_lens is not None:
        # A packed row built without the collator: exact still, at the cost of reading the
        # tensor back in every layer.
        cuts = cu_seq_lens.tolist()
    else:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: one kv head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, scale=scaling, is_causal=True)
        for start, end in zip(cuts[:-1], cuts[1:], strict=True)
        if end > start
    ]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)


def plain_causal(config: Any) -> bool:
    """Whether every layer's attention is plain causal attention over the whole sample: no
    sliding window, no logit soft-capping (what :func:`packed_sdpa_attention` computes)."""
    if getattr(config, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to :func:`packed_sdpa_attention`
    when it runs ``sdpa`` with plain causal attention now; returns whether it did.

    Any other model keeps its attention, and packed rows stay exact through transformers' own
    packed-row mask (built from ``position_ids`` when there is no KV cache), only slower;
    flash-attention reads ``cu_seq_lens_q`` itself.
    """
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or not plain_causal(config):
        return False
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except Exception as e:  # noqa: BLE001 - never fail a job over a faster path
        log.info("keeping %s attention for packed rows: %s", current, e)
        return False
    return True
