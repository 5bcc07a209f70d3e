"""Run with the vLLM environment's Python (``tests/engine/test_vllm_cpu_lora.py`` does):
lorafleet's grouped CPU LoRA ops against a token-by-token reference and against vLLM's own
ops, on the calls vLLM's LoRA layers make. Prints one JSON line of the largest differences.
"""

from __future__ import annotations

import json

import torch
from lorafleet_vllm.cpu_lora import PunicaWrapperCPUGrouped
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

SLOTS, WIDTH = 8, 96
SLICES = (64, 32, 32)  # a merged projection: q, k and v
SCALE = 0.5


def wrappers(indices: torch.Tensor, prefill: bool) -> tuple[PunicaWrapperCPU, ...]:
    made = []
    for cls in (PunicaWrapperCPU, PunicaWrapperCPUGrouped):
        w = cls(512, 64, "cpu")
        w._token_lora_indices[: len(indices)] = indices
        w.indices_len[:] = [len(indices)] * 4
        if prefill:
            w._update_prefill_metadata(w.token_lora_indices)
        w.is_prefill = prefill
        if isinstance(w, PunicaWrapperCPUGrouped):
            w._masks = {}
        made.append(w)
    return tuple(made)


def stacks(rank: int, used_rank: int, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """lora_a and lora_b stacks as vLLM lays them out; adapters of a lower rank than the
    stack's are zero-padded, as vLLM loads them."""
    a = tuple(torch.zeros(SLOTS, 1, rank, WIDTH, dtype=dtype) for _ in SLICES)
    b = tuple(torch.zeros(SLOTS, 1, size, rank, dtype=dtype) for size in SLICES)
    for x in a:
        x[:, :, :used_rank] = torch.randn(SLOTS, 1, used_rank, WIDTH).to(dtype)
    for x in b:
        x[..., :used_rank] = torch.randn(SLOTS, 1, x.shape[2], used_rank).to(dtype)
    return a, b


def reference(y: torch.Tensor, x: torch.Tensor, a: tuple, b: tuple,
              indices: torch.Tensor) -> torch.Tensor:
    """Token by token: y[t] += (x[t] @ A[i].T * scale) @ B[i].T for its slot i, in float64."""
    out = y.double().clone()
    for t, i in enumerate(indices.tolist()):
        if i < 0:
            continue
        offset = 0
        for a_s, b_s, size in zip(a, b, SLICES, strict=True):
            shrunk = x[t].double() @ a_s[i, 0].double().t() * SCALE
            out[t, offset:offset + size] += shrunk @ b_s[i, 0].double().t()
            offset += size
    return out


def case(tokens: int, rank: int, used_rank: int, prefill: bool, no_adapter: bool,
         dtype: torch.dtype, seed: int) -> dict[str, float | bool]:
    torch.manual_seed(seed)
    indices = torch.randint(-1, 0 if no_adapter else SLOTS, (tokens,))
    if prefill:  # a request's tokens share an adapter
        indices = indices.sort().values
    a, b = stacks(rank, used_rank, dtype)
    x = torch.randn(tokens, WIDTH).to(dtype)
    y = torch.randn(tokens, sum(SLICES)).to(dtype)
    vllm_ops, grouped = wrappers(indices, prefill)
    expected = reference(y, x, a, b, indices)
    results = {}
    for name, w in (("vllm", vllm_ops), ("grouped", grouped)):
        out = y.clone()
        w.add_lora_linear(out, x, a, b, SCALE, SLICES)
        results[name] = out
    adapter_rows = indices >= 0
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    def err(out: torch.Tensor) -> float:
        """Largest difference from the reference on adapter rows, relative to its size."""
        if not bool(adapter_rows.any()):
            return 0.0
        diff = (out.double() - expected)[adapter_rows].abs().max().item()
        return diff / max(expected[adapter_rows].abs().max().item(), 1.0)

    # Row-parallel layers call add_shrink with one buffer tensor for all slices, then
    # add_expand; with add_inputs=False the output is overwritten by the LoRA delta.
    buffer = torch.zeros(len(SLICES), tokens, rank, dtype=torch.float32)
    grouped.add_shrink(buffer, x, a, SCALE)
    delta = torch.full_like(y, 7.0)
    grouped.add_expand(delta, buffer, b, SLICES, add_inputs=False)
    return {
        "grouped": err(results["grouped"]), "vllm": err(results["vllm"]), "tol": tol,
        "base_rows_untouched": bool(torch.equal(results["grouped"][~adapter_rows],
                                                y[~adapter_rows])),
        "overwritten": err(delta.double() + y.double()),
        "overwritten_base_rows_zero": bool((delta[~adapter_rows] == 0).all()),
    }


if __name__ == "__main__":
    cases = {
        "decode, rank 8": case(32, 8, 8, False, False, torch.float32, 1),
        "prefill, rank 8": case(300, 8, 8, True, False, torch.float32, 2),
        "decode, rank-8 adapters in rank-64 slots": case(32, 64, 8, False, False,
                                                         torch.float32, 3),
        "prefill, rank 64": case(200, 64, 64, True, False, torch.float32, 4),
        "decode, one token": case(1, 16, 16, False, False, torch.float32, 5),
        "decode, no adapter": case(16, 8, 8, False, True, torch.float32, 6),
        "decode, bfloat16": case(32, 16, 16, False, False, torch.bfloat16, 7),
    }
    print(json.dumps(cases))
