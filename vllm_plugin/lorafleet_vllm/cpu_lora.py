"""vLLM's CPU LoRA wrapper with its shrink and expand done as one matrix product per slice.

vLLM's CPU LoRA ops (``vllm.lora.ops.torch_ops``) gather every token's adapter weights
(``weights[token_indices]``: a copy of ``rank x width`` numbers per token and layer) and then
multiply token by token. Here the tokens' inputs are multiplied by the weights of all the
adapter slots at once (one product with a ``slots*rank``-wide matrix), and a one-hot mask of
each token's slot keeps the part of its own adapter; expanding is the same product the other
way. The work then grows with the number of tokens once, not with tokens times adapter size,
and ``bench/cpu_lora.py`` measures the difference. Tokens without an adapter (index -1) get
nothing added, as on vLLM's GPU kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU


class _Transposed:
    """The ``slots*rank x width`` copies of lora_b stacks, kept until vLLM writes into them
    (a stack's ``_version`` changes when an adapter is loaded into a slot)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def of(self, b: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(b))
        if hit is not None and hit[0] == b._version and hit[1] is b:
            return hit[2]
        slots, _, width, rank = b.shape
        flat = b.view(slots, width, rank).permute(0, 2, 1).reshape(slots * rank, width)
        self._cache[id(b)] = (b._version, b, flat)
        return flat


class PunicaWrapperCPUGrouped(PunicaWrapperCPU):
    """:class:`PunicaWrapperCPU` whose ``add_shrink``, ``add_expand`` and ``add_lora_linear``
    compute one product per slice for all the adapters of a batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # By (slots, dtype), for the batch's indices: None when no token has an adapter.
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}
        self._transposed = _Transposed()

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._masks = {}

    def _mask(self, slots: int, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``tokens x slots x 1``: 1 where the token uses the slot; None when no token has an
        adapter."""
        key = (slots, dtype)
        if key not in self._masks:
            indices = self.token_lora_indices
            if indices.numel() == 0 or bool((indices < 0).all()):
                self._masks[key] = None
            else:
                mask = torch.nn.functional.one_hot(indices.clamp(min=0), slots)
                mask = mask * (indices >= 0).unsqueeze(1)
                self._masks[key] = mask.to(dtype).unsqueeze(2)
        mask = self._masks[key]
        if mask is not None and mask.shape[0] != tokens:
            raise ValueError(f"{tokens} tokens but {mask.shape[0]} LoRA indices")
        return mask

    def add_shrink(self, y: Any, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                   scale: float, **kwargs: Any) -> None:
        x = x.view(-1, x.shape[-1])
        for slice_idx, a in enumerate(lora_a_stacked):
            out = y[slice_idx]
            slots, _, rank, width = a.shape
            mask = self._mask(slots, x.shape[0], out.dtype)
            if mask is None:
                out.view(-1, out.shape[-1])[:, :rank] = 0
                continue
            every = torch.mm(x.to(a.dtype), a.view(slots * rank, width).t())
            own = (every.view(-1, slots, rank).to(out.dtype) * mask).sum(dim=1)
            out.view(-1, out.shape[-1])[:, :rank] = own * scale

    def add_expand(self, y: torch.Tensor, x: Any, lora_b_stacked: tuple[torch.Tensor, ...],
                   output_slices: tuple[int, ...], offset_start: int = 0,
                   add_inputs: bool = True, **kwargs: Any) -> None:
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for slice_idx, b in enumerate(lora_b_stacked):
            size = output_slices[slice_idx]
            slots, _, width, rank = b.shape
            mask = self._mask(slots, y2.shape[0], b.dtype)
            target = y2[:, offset:offset + min(size, width)]
            if mask is None:
                if not add_inputs:
                    target.zero_()
            else:
                spread = (x[slice_idx].to(b.dtype).unsqueeze(1) * mask).view(-1, slots * rank)
                delta = torch.mm(spread, self._transposed.of(b)[:, :target.shape[1]])
                if add_inputs:
                    target += delta.to(y2.dtype)
                else:
                    target.copy_(delta)
            offset += size
