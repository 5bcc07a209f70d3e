"""The last decoder layer, run only where a loss is taken.

With the loss on the response only, most positions of a batch carry no target: their output at
the last layer feeds nothing but the LM head, which already skips them (``logits_to_keep``).
What the positions *do* feed there is the keys and values that the labeled positions attend
to. So in the last layer this computes the keys and values at every position, and the queries,
attention output, MLP and residual at the labeled positions alone. Exact: the loss and every
gradient equal the full layer's, to float rounding (a test checks it).

It applies to a packed row (see :mod:`worker.attention`) of a Phi model (attention and MLP in
parallel on one layer norm); anything else runs the layer as it is. The collator sends what the
layer needs, made on the host by :func:`last_layer_inputs`: the labeled positions as indices
(``loss_rows``, a tensor, for the gathers) and, as Python ints, where each sample's queries and
keys lie (``loss_spans``, a :class:`LossSpans`), so the layer never reads a tensor back from
the GPU (see :mod:`worker.attention` for how such host values reach a layer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812
from transformers.models.phi.modeling_phi import rotate_half

log = logging.getLogger(__name__)

# The batch entries of a packed row for the layer: the labeled positions as a (1, T) mask (for
# whoever reads the batch; the layer uses the other two), as sorted indices, and the spans.
LOSS_POSITIONS = "loss_positions"
LOSS_ROWS = "loss_rows"
LOSS_SPANS = "loss_spans"
# Above this share of labeled positions the gathers cost more than the layer saves.
MAX_SHARE = 0.75


@dataclass(frozen=True)
class QuerySpan:
    """One sample's labeled positions among the row's: ``rows[first:end]`` are its queries,
    which attend to the keys ``key_start:key_end`` (its first position to its last query)."""

    key_start: int
    first: int
    end: int
    key_end: int


@dataclass(frozen=True)
class LossSpans:
    """The spans of the samples that have labeled positions, in row order."""

    spans: tuple[QuerySpan, ...]


def last_layer_inputs(rows: Sequence[int], cuts: Sequence[int]) -> dict[str, Any]:
    """The batch entries for a patched last layer, from a packed row's labeled positions
    ``rows`` (sorted) and its sample boundaries ``cuts`` (``SampleBounds.cuts``), host ints."""
    spans = []
    i = 0
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        first = i
        while i < len(rows) and rows[i] < stop:
            i += 1
        if i > first:
            spans.append(QuerySpan(start, first, i, rows[i - 1] + 1))
    keep = torch.zeros((1, cuts[-1]), dtype=torch.bool)
    index = torch.tensor(rows, dtype=torch.long)
    keep[0, index] = True
    return {LOSS_POSITIONS: keep, LOSS_ROWS: index, LOSS_SPANS: LossSpans(tuple(spans))}


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """Phi's partial rotary embedding on ``(1, heads, n, head_dim)``; ``cos``/``sin`` are
    ``(1, n, dims)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def _attend(attn: Any, x: torch.Tensor, rows: torch.Tensor, spans: LossSpans,
            cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Phi self-attention of the positions ``rows`` (sorted) over their own samples' keys."""
    head_dim = attn.head_dim
    q = attn.q_proj(x[:, rows]).view(1, rows.numel(), -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
    if attn.qk_layernorm:
        q, k = attn.q_layernorm(q), attn.k_layernorm(k)
    q = _rotary(q, cos[:, rows], sin[:, rows], attn.rotary_ndims)
    k = _rotary(k, cos, sin, attn.rotary_ndims)
    groups = attn.num_key_value_groups
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    dropout = attn.attention_dropout if attn.training else 0.0
    pieces = []
    for span in spans.spans:
        # Keys after the sample's last query are never read.
        keys = torch.arange(span.key_start, span.key_end, device=rows.device)
        queries = rows[span.first:span.end]
        mask = keys.unsqueeze(0) <= queries.unsqueeze(1)  # causal, within the sample
        pieces.append(F.scaled_dot_product_attention(
            q[:, :, span.first:span.end], k[:, :, span.key_start:span.key_end],
            v[:, :, span.key_start:span.key_end], attn_mask=mask, dropout_p=dropout,
            scale=attn.scaling))
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return attn.dense(out.transpose(1, 2).reshape(1, rows.numel(), -1))


def _phi_forward(layer: Any, full: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop(LOSS_POSITIONS, None)
        rows: torch.Tensor | None = kwargs.pop(LOSS_ROWS, None)
        spans: LossSpans | None = kwargs.pop(LOSS_SPANS, None)
        embeddings = kwargs.get("position_embeddings")
        if (rows is None or spans is None or embeddings is None or args
                or kwargs.get("cache") is not None or hidden_states.shape[0] != 1
                or kwargs.get("attention_mask") is not None):
            return full(hidden_states, *args, **kwargs)
        if rows.numel() == 0 or rows.numel() > MAX_SHARE * hidden_states.shape[1]:
            return full(hidden_states, *args, **kwargs)
        cos, sin = embeddings
        x = layer.input_layernorm(hidden_states)
        attn_out = _attend(layer.self_attn, x, rows, spans, cos, sin)
        mlp_out = layer.mlp(x[:, rows])
        kept = (layer.resid_dropout(attn_out) + layer.resid_dropout(mlp_out)
                + hidden_states[:, rows])
        # Full length again, so the model's final norm and ``logits_to_keep`` apply as usual;
        # the positions left at zero are never read.
        return hidden_states.new_zeros(hidden_states.shape).index_copy(1, rows, kept)

    forward.loss_positions_only = True  # type: ignore[attr-defined]
    return forward


def run_last_layer_on_loss_positions(model: Any) -> bool:
    """Patch ``model``'s (a transformers Phi ``PreTrainedModel``) last decoder layer; returns
    whether it did. The batches must then carry :func:`last_layer_inputs`."""
    if getattr(model.config, "model_type", None) != "phi":
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    layer = layers[-1]
    if not is_patched(model):
        layer.forward = _phi_forward(layer, layer.forward)
    return True


def is_patched(model: Any) -> bool:
    """Whether ``model`` (or the base model under a peft wrapper) runs its last layer on
    ``loss_positions``."""
    for module in model.modules():
        if getattr(getattr(module, "forward", None), "loss_positions_only", False):
            return True
    return False
