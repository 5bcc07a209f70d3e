"""vLLM's CPU LoRA ops vs lorafleet's grouped ones (``vllm_plugin/``), on the shapes of the
serving benchmark's model.

    python -m bench.cpu_lora              # about 3 minutes; rewrites its BENCHMARKS.md section
    python -m bench.cpu_lora --no-write   # print only

The LoRA work of one forward pass of the serving benchmark's model (``bench/serving_fixtures``:
6 layers, hidden 384, MLP 1536; LoRA on the merged q/k/v projection, dense, fc1 and fc2), as
vLLM's CPU model runner calls it: ``add_lora_linear`` on each layer, with 8 adapter slots in
use, one torch thread (as a vLLM server computes on a CPU). Timed for a decode step of 32
requests (32 tokens) and a prefill of 32 prompts (1,024 tokens), at the slot ranks vLLM's
``--max-lora-rank`` sets, with vLLM's ``PunicaWrapperCPU`` and lorafleet's
``PunicaWrapperCPUGrouped``, alternating; for scale, the same layers' base matrix products.
The measurement runs in the vLLM environment's Python (``make venv-vllm``); end to end, through
the API, the serving benchmark compares the two (``bench/serving.py``, engine ``vllm-ops``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "CPU LoRA ops"
HIDDEN, MLP, LAYERS, SLOTS = 384, 1536, 6, 8
# (input width, output slices) of each LoRA layer of one transformer block.
MODULES = [(HIDDEN, (HIDDEN, HIDDEN, HIDDEN)), (HIDDEN, (HIDDEN,)), (HIDDEN, (MLP,)),
           (MLP, (HIDDEN,))]
CASES = [("decode", 32), ("prefill", 1024)]
RANKS = [8, 16, 64]
RUN_SECONDS = 2.0  # a timed run's length, at most (but 3 passes at least)


def measure(repeats: int) -> dict[str, Any]:
    """In the vLLM environment: milliseconds per forward pass's LoRA work, by case and rank."""
    import torch
    from lorafleet_vllm.cpu_lora import PunicaWrapperCPUGrouped
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    torch.set_num_threads(1)
    torch.manual_seed(0)
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cases": []}
    for kind, tokens in CASES:
        # Each request's tokens share an adapter; 32 requests over the 8 slots.
        indices = torch.arange(32).repeat_interleave(tokens // 32) % SLOTS
        xs = [torch.randn(tokens, width) for width, _ in MODULES]
        base = [torch.randn(sum(out), width) for width, out in MODULES]
        base_ms = timed(base_pass, repeats, xs, base)
        for rank in RANKS:
            layers = [(out, x, torch.zeros(tokens, sum(out)),
                       tuple(torch.randn(SLOTS, 1, rank, width) * 0.01 for _ in out),
                       tuple(torch.randn(SLOTS, 1, size, rank) * 0.01 for size in out))
                      for (width, out), x in zip(MODULES, xs, strict=True)]
            wrappers = {"vllm": PunicaWrapperCPU(4096, 256, "cpu"),
                        "grouped": PunicaWrapperCPUGrouped(4096, 256, "cpu")}
            for w in wrappers.values():
                w._token_lora_indices[:tokens] = indices
                w.indices_len[:] = [tokens] * 4
                if kind == "prefill":
                    w._update_prefill_metadata(w.token_lora_indices)
                w.is_prefill = kind == "prefill"
            runs: dict[str, list[float]] = {name: [] for name in wrappers}
            for _ in range(3):  # alternating, so that drifts of the machine hit both
                for name, w in wrappers.items():
                    runs[name].append(timed(lora_pass, repeats, w, layers))
            vllm_ms, grouped_ms = (statistics.median(runs[k]) for k in ("vllm", "grouped"))
            results["cases"].append({
                "kind": kind, "tokens": tokens, "rank": rank, "base_ms": round(base_ms, 3),
                "vllm_ms": round(vllm_ms, 3), "grouped_ms": round(grouped_ms, 3),
                "speedup": round(vllm_ms / grouped_ms, 2)})
            print(json.dumps(results["cases"][-1]), file=sys.stderr, flush=True)
    return results


def base_pass(xs: list[Any], weights: list[Any]) -> None:
    """The LoRA layers' own matrix products in one forward pass."""
    for _ in range(LAYERS):
        for x, w in zip(xs, weights, strict=True):
            x @ w.t()


def lora_pass(wrapper: Any, layers: list[tuple[Any, ...]]) -> None:
    """One forward pass's LoRA work, as vLLM's LoRA layers call it."""
    if hasattr(wrapper, "_masks"):
        wrapper._masks = {}  # the grouped wrapper keeps its masks for one step
    for _ in range(LAYERS):
        for out, x, y, a, b in layers:
            wrapper.add_lora_linear(y, x, a, b, 1.0, out)


def timed(fn: Any, repeats: int, *args: Any) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` calls (fewer, at least 3, where
    they would take more than :data:`RUN_SECONDS`), after one untimed."""
    start = time.perf_counter()
    fn(*args)
    once = time.perf_counter() - start
    times = []
    for _ in range(max(3, min(repeats, int(RUN_SECONDS / max(once, 1e-9))))):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def markdown(results: dict[str, Any]) -> str:
    from bench.report import stamp, table

    rows = [[c["kind"], str(c["tokens"]), str(c["rank"]), f"{c['base_ms']:.2f}",
             f"{c['vllm_ms']:.2f}", f"{c['grouped_ms']:.2f}", f"**{c['speedup']}x**"]
            for c in results["cases"]]
    return "\n".join([
        f"## {SECTION}", "",
        f"`python -m bench.cpu_lora` ({stamp()}). Machine: {results['machine']}; vLLM "
        f"environment: {results['versions']}; {results['torch_threads']} torch thread; load "
        f"average {results['load']} at the start.", "",
        "The LoRA work of one forward pass of the serving benchmark's model (6 layers, hidden "
        "384, MLP 1536; LoRA on q/k/v, dense, fc1, fc2) over 8 adapter slots, as vLLM's CPU "
        "model runner calls it (`add_lora_linear` per layer). *vLLM*: its `PunicaWrapperCPU` "
        "(gathers each token's adapter weights, then multiplies token by token); *grouped*: "
        "lorafleet's `PunicaWrapperCPUGrouped` from `vllm_plugin/` (one product per slice "
        "with all the slots' weights, a one-hot mask per token), which `lorafleet serve` "
        "gives the vLLM servers it starts on a CPU (`LORAFLEET_VLLM_CPU_LORA_OPS`). *Base*: "
        "the same layers' own matrix products, for scale. Median of 3 alternating runs of "
        f"up to {results['repeats']} passes each (at least 3, and fewer where they would "
        f"take over {RUN_SECONDS:g} s).", "",
        table(["Step", "Tokens", "Slot rank", "Base ms", "vLLM ms", "Grouped ms",
               "vLLM / grouped"], rows), ""])


def vllm_python() -> Path:
    return ROOT / ".venv-vllm" / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="passes per timed run")
    parser.add_argument("--no-write", action="store_true", help="do not edit BENCHMARKS.md")
    parser.add_argument("--measure", action="store_true",
                        help="(internal) measure in this Python and print JSON")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.repeats)))
        return 0
    python = vllm_python()
    if not python.is_file():
        print(f"no vLLM environment ({python}): `make venv-vllm`", file=sys.stderr)
        return 2
    from bench.report import load, machine, replace_section
    from bench.serving import vllm_versions

    start_load = load()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--measure",
                           "--repeats", str(args.repeats)],
                          stdout=subprocess.PIPE, env=env, cwd=ROOT, check=True, text=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    versions = vllm_versions()
    results.update(machine=machine(), load=start_load, repeats=args.repeats,
                   versions=", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    text = markdown(results)
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
