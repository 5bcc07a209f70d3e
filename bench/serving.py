"""Serving benchmark: lorafleet on vLLM vs the built-in engine vs one request at a time, all
through the API over HTTP.

    python -m bench.serving              # about 12 minutes on two CPU cores
    python -m bench.serving --no-write   # print only (also: python bench/serving.py)
    python -m bench.serving --quick      # a smaller run, to try the benchmark (no write)
    python -m bench.serving --report     # only rewrite the section from bench/out/serving.json

One run, one model, the same adapters (``bench/serving_fixtures.py``), real ``lorafleet api``
and ``lorafleet serve`` processes (``bench/serving_latency.py``). The engine is started,
measured and stopped once per entry of :data:`ENGINES`: lorafleet on vLLM
(``LORAFLEET_ENGINE_BACKEND=vllm``, which starts a vLLM server from ``.venv-vllm``) with the
default settings (on a CPU host the server starts at the smallest ``--max-lora-rank`` that
covers the adapters: 8 here), and held at 16 and at 64 (``LORAFLEET_VLLM_MAX_LORA_RANK`` with
``LORAFLEET_VLLM_ADAPTIVE_LORA_RANK=false``: what serving a rank-16 or rank-64 adapter beside
them costs, since vLLM's CPU LoRA kernels compute at the maximum rank), with vLLM's own CPU
LoRA ops instead of lorafleet's plugin's (``vllm-ops``) and with vLLM's model processes at
normal CPU priority instead of ``SCHED_IDLE`` (``vllm-normal``), then the built-in engine
(``LORAFLEET_ENGINE_BACKEND=builtin``). The model is a ~12M-parameter Phi built from
a config (random weights, the project's own tokenizer; head dim 64, which vLLM's CPU attention
takes); the adapters are random LoRA adapters (r=8 on attention
and MLP projections) carrying the parity probe the worker records for a succeeded job, so vLLM
replays and passes it when it first loads each one. Before anything is timed, the base model is
loaded (on vLLM: its server started, 45-75 s) and every adapter used once (on vLLM: loaded and
its probe checked). Requests are greedy (``temperature 0``), raw prompts, streamed
(``stream: true``): TTFT is the time to the first chunk with text, latency the time to the end
of the stream, tokens come from the usage chunk.

1. Throughput: ``--requests`` concurrent requests over ``--adapters`` adapters, and the same
   requests one at a time, on each engine. Goals: vLLM concurrent >= 6x vLLM's own one at a
   time; vLLM concurrent >= 1.3x the built-in engine concurrent.
2. Continuous batching: ``--long-requests`` requests of ``--long-tokens`` tokens, then, once
   all generate, one request of 8 tokens, ``--idle-shorts`` times one after the other while
   the batch runs (as many times as on the idle engine). Goal (vLLM): its median TTFT <= 2x
   its median TTFT on an idle engine, and they end before the batch does.
3. Adapter rows vs base rows: the concurrent requests on the base model vs over the adapters.
   Goal: wall time <= 1.3x.
4. Status polling (``bench/serving_polls.py``): p99 of ``GET /v1/fine_tuning/jobs/{id}``
   while the vLLM engine (default settings) is saturated vs idle, also with the web console's
   own requests replayed (recorded once from the real page in headless Chromium). Goals:
   <= 2x idle, both; and with the console's requests close to the figure without them. The
   same on vLLM with its model processes at normal CPU priority instead of ``SCHED_IDLE``
   (``LORAFLEET_VLLM_CPU_SCHEDULING=normal``), for comparison.

Results are printed, written to ``bench/out/serving.json`` and, unless ``--no-write``, put in
the "Serving" section of BENCHMARKS.md (``bench/serving_report.py``; other sections are left
as they are).
"""
from __future__ import annotations

import argparse
import glob
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

from bench.serving_fixtures import LORA_RANK, build_adapter, build_model, prompts  # noqa: E402
from bench.serving_latency import (  # noqa: E402
    VLLM_PYTHON,
    Call,
    LiveService,
    run_calls,
    run_interleaved,
)
from bench.serving_polls import status_poll  # noqa: E402
from bench.serving_report import goals, markdown, write_section  # noqa: E402

# The engines compared: name, label and the settings ``lorafleet serve`` runs with. vLLM
# sizes its LoRA slots by --max-lora-rank and its CPU kernels compute at that rank whatever the
# adapter's. By default a CPU server starts at the smallest rank that covers its adapters (8
# here); held at 16 and 64, vLLM shows what a larger adapter among them costs.
ENGINES: dict[str, tuple[str, dict[str, str]]] = {
    "vllm": ("vLLM, default max LoRA rank", {"LORAFLEET_ENGINE_BACKEND": "vllm"}),
    "vllm-rank16": ("vLLM, max LoRA rank held at 16", {
        "LORAFLEET_ENGINE_BACKEND": "vllm", "LORAFLEET_VLLM_MAX_LORA_RANK": "16",
        "LORAFLEET_VLLM_ADAPTIVE_LORA_RANK": "false"}),
    "vllm-rank64": ("vLLM, max LoRA rank held at 64", {
        "LORAFLEET_ENGINE_BACKEND": "vllm", "LORAFLEET_VLLM_MAX_LORA_RANK": "64",
        "LORAFLEET_VLLM_ADAPTIVE_LORA_RANK": "false"}),
    # vLLM's own CPU LoRA ops instead of lorafleet's grouped ones (vllm_plugin/,
    # bench/cpu_lora.py): what the plugin changes end to end.
    "vllm-ops": ("vLLM, default max LoRA rank, vLLM's own CPU LoRA ops",
                 {"LORAFLEET_ENGINE_BACKEND": "vllm", "LORAFLEET_VLLM_CPU_LORA_OPS": "vllm"}),
    # vLLM's model processes scheduled as every other process, instead of SCHED_IDLE
    # (LORAFLEET_VLLM_CPU_SCHEDULING): what the default changes for the API's status polls.
    "vllm-normal": ("vLLM, default max LoRA rank, model at normal CPU priority",
                    {"LORAFLEET_ENGINE_BACKEND": "vllm",
                     "LORAFLEET_VLLM_CPU_SCHEDULING": "normal"}),
    # The engine and its vLLM servers at a lower CPU priority than the API (Unix niceness 10):
    # what a host that runs both on the same CPUs can do (LORAFLEET_ENGINE_NICE).
    "vllm-nice": ("vLLM, default max LoRA rank, engine niced 10",
                  {"LORAFLEET_ENGINE_BACKEND": "vllm", "LORAFLEET_ENGINE_NICE": "10"}),
    "builtin": ("built-in", {"LORAFLEET_ENGINE_BACKEND": "builtin"}),
}
VLLM_ENGINES = [k for k, (_, env) in ENGINES.items() if env["LORAFLEET_ENGINE_BACKEND"] == "vllm"]
SHORT_TOKENS = 8


# --------------------------------------------------------------------------- one engine
def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time (with an even count, the faster of the middle two)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "walls_s": [r["wall_s"] for r in runs]}


def _batches(service: LiveService, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s figures plus the CPU seconds each part of the service used meanwhile
    (``cpu_s``, by role: :meth:`LiveService.cpu_seconds`) and, on the built-in engine, the
    batches it ran as: their count and (up to 20) how many requests each held."""
    before = service.engine_stats().get("batches")
    cpu = service.cpu_seconds()
    figures = measure()
    figures["cpu_s"] = {k: round(v - cpu.get(k, 0.0), 2)
                        for k, v in service.cpu_seconds().items()}
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
    out: dict[str, Any] = {"label": ENGINES[backend][0], "settings": ENGINES[backend][1],
                           "load_average_at_start": round(os.getloadavg()[0], 2)}
    service.start_engine(ENGINES[backend][1])
    try:
        out["warm_up"] = service.warm_up()
        log(f"[{backend}] warmed up: {out['warm_up']}", flush=True)
        if "max_lora_rank" in out["warm_up"] and "LORAFLEET_VLLM_MAX_LORA_RANK" not in (
                out["settings"]):
            out["label"] += f" ({out['warm_up']['max_lora_rank']})"
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
            service.url, service.key, long, short, shorts=args.idle_shorts).summary())
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
                        help="the short request on an idle engine, and during the long batch "
                        "(one after the other), this many times (median)")
    parser.add_argument("--poll-seconds", type=float, default=12.0,
                        help="how long status polls are timed per state (idle, saturated, "
                        "and each with the console's requests)")
    parser.add_argument("--windows", type=int, default=4,
                        help="the states alternate this many times")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES),
                        default=[k for k in ENGINES if k != "vllm-nice"],
                        help="default: all but vllm-nice")
    parser.add_argument("--poll-engines", nargs="*", choices=list(ENGINES),
                        default=["vllm", "vllm-normal"],
                        help="engines the status polls are measured on")
    parser.add_argument("--no-console", action="store_true",
                        help="do not replay the web console's requests during the status polls")
    parser.add_argument("--console-record-seconds", type=float, default=17.0,
                        help="how long the console's job page is recorded in Chromium (its "
                        "requests are then replayed at this period; 17 s holds one refresh of "
                        "the job's events)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the built-in engine")
    parser.add_argument("--quick", action="store_true",
                        help="a small run to try the benchmark (implies --no-write)")
    parser.add_argument("--no-write", action="store_true", help="do not edit BENCHMARKS.md")
    parser.add_argument("--note", help="what else ran on the machine, for the report (e.g. "
                        "'bench.quality ran on it throughout')")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (model, adapters, service logs)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the BENCHMARKS.md section from bench/out/serving.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.no_write = True
        args.requests, args.max_tokens, args.repeats = 16, 16, 1
        args.long_requests, args.long_tokens, args.idle_shorts = 8, 64, 1
        args.poll_seconds, args.windows, args.console_record_seconds = 4.0, 2, 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = ROOT / "bench" / "out"
    if args.report:
        saved: dict[str, Any] = json.loads((out / "serving.json").read_text())
        saved["goals"] = goals(saved)
        saved["note"] = args.note or saved.get("note")
        text = markdown(saved)
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
        "threads": args.threads, "cores": os.cpu_count(), "repeats": args.repeats,
        "idle_shorts": args.idle_shorts,
        "short_max_tokens": SHORT_TOKENS, "note": args.note,
        "versions": {"vllm_env": vllm_versions() if VLLM_PYTHON.is_file() else {}},
        "engines": {},
    }
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    try:
        model = build_model(root / "model")
        adapters = [build_adapter(model, root / f"adapter-{i}", seed=i, r=LORA_RANK, std=0.05,
                                  probe=True)
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
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("serving-quick.json" if args.quick else "serving.json")
    path.write_text(json.dumps(results, indent=2))  # kept even if the report fails (--report)
    results["goals"] = goals(results)
    path.write_text(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
