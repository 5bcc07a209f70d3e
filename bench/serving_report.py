"""Serving benchmark, the report: the goals and their verdicts, the "Serving" section of
BENCHMARKS.md in markdown, and its place in that file (other sections are left as they are).

Everything here reads the results ``bench/serving.py`` writes to ``bench/out/serving.json``
(``python -m bench.serving --report`` rewrites the section from that file alone).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.serving_fixtures import LORA_RANK, LORA_TARGETS, MODEL

SECTION = "## Serving"
RANK = "LORAFLEET_VLLM_MAX_LORA_RANK"
CONSOLE_CLOSE = 1.25  # "close to the figure without": saturated p99 with / without the console


# --------------------------------------------------------------------------- engines
def label(results: dict[str, Any], key: str) -> str:
    return str(results["engines"][key].get("label", key))


def is_vllm(figures: dict[str, Any]) -> bool:
    return bool(figures["settings"]["LORAFLEET_ENGINE_BACKEND"] == "vllm")


def rank(figures: dict[str, Any]) -> str:
    """The ``--max-lora-rank`` a vLLM engine ran with (as read from its server, else as set)."""
    found = figures.get("warm_up", {}).get("max_lora_rank", figures["settings"].get(RANK))
    return "?" if found is None else str(found)


# --------------------------------------------------------------------------- goals
def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals: each with its measured figure, the figures it comes from, and whether met
    (None: a figure shown for contrast, with no goal)."""
    e = results["engines"]
    n = results["requests"]
    short = results.get("short_max_tokens", 8)
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | bool, goal: str, met: bool | None, detail: str) -> None:
        rows.append({"name": name, "value": value, "goal": goal, "met": met, "detail": detail})

    def tps(key: str, run: str) -> float:
        return float(e[key][run]["tokens_per_s"])

    for key in e:
        name, vllm = label(results, key), is_vllm(e[key])
        own = tps(key, "concurrent") / tps(key, "sequential")
        add(f"{name}: {n} concurrent requests vs the same one at a time on {name} "
            "(tokens/s)", round(own, 2), ">= 6x" if vllm else "(none)",
            own >= 6 if vllm else None,
            f"{tps(key, 'concurrent')} vs {tps(key, 'sequential')} tok/s")
        if vllm and "builtin" in e:
            ratio = tps(key, "concurrent") / tps("builtin", "concurrent")
            add(f"{name} vs built-in, {n} concurrent (tokens/s)", round(ratio, 2), ">= 1.3x",
                ratio >= 1.3, f"{tps(key, 'concurrent')} vs {tps('builtin', 'concurrent')} "
                "tok/s")
        if vllm:
            c = e[key]["continuous"]
            add(f"{name}: TTFT of a request of {short} tokens sent while "
                f"{c['long_requests']} long requests generate, vs on the idle engine",
                c["ttft_ratio"], "<= 2x", c["ttft_ratio"] <= 2,
                f"{c['short_ttft_ms']} vs {c['idle_short_ttft_ms']} ms")
            add(f"{name}: that request ends before the long batch does",
                c["short_before_batch_end"], "yes", bool(c["short_before_batch_end"]),
                f"after {c['short_done_after_s']} s; batch {c['batch_seconds']} s")
        m, b = e[key]["concurrent"]["wall_s"], e[key]["concurrent_base"]["wall_s"]
        add(f"{name}: {n} concurrent requests over {results['adapters']} adapters vs on the "
            "base model (wall time)", round(m / b, 2), "<= 1.3x", m / b <= 1.3,
            f"{m} vs {b} s")
        s = e[key].get("status_poll")
        if s is not None:
            rows.extend(poll_goals(name, s))
    return rows


def poll_goals(name: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    """The status-poll goals (#15): p99 saturated <= 2x idle, also with the console's requests
    replayed, and the latter close to the figure without them."""
    idle, busy = s["idle"]["p99_ms"], s["busy"]["p99_ms"]
    rows = [{"name": f"{name}: `GET /v1/fine_tuning/jobs/{{id}}` p99, engine saturated vs idle",
             "value": s["p99_ratio"], "goal": "<= 2x", "met": s["p99_ratio"] <= 2,
             "detail": f"{busy} vs {idle} ms"}]
    if "console_p99_ratio" in s:
        both = s["busy_console"]["p99_ms"]
        rows.append({"name": f"{name}: the same with the web console's requests replayed "
                     "(saturated with them vs idle without)", "value": s["console_p99_ratio"],
                     "goal": "<= 2x", "met": s["console_p99_ratio"] <= 2,
                     "detail": f"{both} vs {idle} ms"})
        rows.append({"name": f"{name}: saturated p99 with the console's requests vs without",
                     "value": s["console_vs_without"], "goal": f"<= {CONSOLE_CLOSE}x",
                     "met": s["console_vs_without"] <= CONSOLE_CLOSE,
                     "detail": f"{both} vs {busy} ms"})
    return rows


# --------------------------------------------------------------------------- markdown
def command(text: str) -> str:
    """The command without the options that only choose where results go, and without the
    ``--note`` (the report quotes it on its own)."""
    text = re.sub(r" --note(?:=| ).*?(?= --|$)", "", text)
    return " ".join(w for w in text.split() if w not in ("--no-write", "--keep"))


def ran_as(figures: dict[str, Any]) -> str:
    """How the built-in engine batched a run's requests ('' elsewhere)."""
    sizes = figures.get("batch_requests", [])
    if sizes and max(sizes) > 1:
        return f"; engine batches of {' + '.join(map(str, sizes))} requests"
    if "engine_batches" in figures:
        return f"; {figures['engine_batches']} engine batches"
    return ""


def loads(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def verdict(met: bool | None) -> str:
    return "" if met is None else "met" if met else "**missed**"


def times(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value}x"


def goal_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The goals as a markdown table."""
    return ["| Goal | Measured | Goal | Met |", "|---|---|---|---|"] + [
        f"| {g['name']} | **{times(g['value'])}** ({g['detail']}) | {g['goal']} | "
        f"{verdict(g['met'])} |" for g in rows]


def run_rows(results: dict[str, Any]) -> list[str]:
    """One row per run (concurrent, one at a time, base model) and engine."""
    e, n = results["engines"], results["requests"]
    lines = ["| Run | Engine | Wall s | Tokens | Tokens/s | TTFT p50 / p99 ms | "
             "Latency p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    runs = [("concurrent", f"{n} concurrent, {results['adapters']} adapters"),
            ("sequential", f"the same {n}, one at a time"),
            ("concurrent_base", f"{n} concurrent, base model")]
    for run, title in runs:
        for key in e:
            r = e[key][run]
            lines.append(f"| {title} | {label(results, key)}{ran_as(r)} | {r['wall_s']} | "
                         f"{r['tokens']} | **{r['tokens_per_s']}** | {r['ttft_p50_ms']} / "
                         f"{r['ttft_p99_ms']} | {r['latency_p50_ms']} / {r['latency_p99_ms']} |")
    return lines


CPU_ROLES = [("api", "API"), ("engine", "engine"), ("vllm_server", "vLLM server"),
             ("vllm_core", "vLLM engine core"), ("clients", "clients")]


def cpu_rows(results: dict[str, Any]) -> list[str]:
    """Where the CPU went in the concurrent run over the adapters and one at a time: CPU
    seconds by process and their total against wall time × cores (empty without figures)."""
    e, n = results["engines"], results["requests"]
    cores = results.get("cores") or 2
    runs = [("concurrent", f"{n} concurrent, {results['adapters']} adapters"),
            ("sequential", f"the same {n}, one at a time")]
    lines = []
    for run, title in runs:
        for key in e:
            r = e[key][run]
            cpu = r.get("cpu_s")
            if not cpu:
                continue
            total = sum(cpu.values())
            lines.append(f"| {title} | {label(results, key)} | "
                         + " | ".join(f"{cpu.get(role, 0.0):.2f}" for role, _ in CPU_ROLES)
                         + f" | **{total:.2f}** | {total / (r['wall_s'] * cores):.0%} |")
    if not lines:
        return []
    return ["| Run | Engine | " + " | ".join(name for _, name in CPU_ROLES)
            + f" | Total | Of wall × {cores} cores |",
            "|---|---|" + "---|" * (len(CPU_ROLES) + 2), *lines]


def relay_share(figures: dict[str, Any]) -> float | None:
    """The share of a run's CPU seconds spent outside generation and the clients: the API,
    the engine and vLLM's HTTP front end (None without figures)."""
    cpu = figures.get("cpu_s")
    if not cpu or not sum(cpu.values()):
        return None
    hops = cpu.get("api", 0.0) + cpu.get("vllm_server", 0.0)
    if cpu.get("vllm_core", 0.0) > 0:
        hops += cpu.get("engine", 0.0)  # on vLLM the engine only relays
    return hops / sum(cpu.values())


def poll_rows(s: dict[str, Any]) -> list[str]:
    """The status polls' table: one row per state."""
    lines = ["| State | Polls | p50 ms | p99 ms |", "|---|---|---|---|"]
    for state in ("idle", "busy", "idle_console", "busy_console"):
        if state in s:
            title = state.replace("busy", "saturated").replace(
                "_console", ", console's requests replayed")
            lines.append(f"| {title} | {s[state]['polls']} | {s[state]['p50_ms']} | "
                         f"{s[state]['p99_ms']} |")
    return lines


def spread(results: dict[str, Any]) -> str:
    """The range of the 1-minute load average over the engines' runs ('' if one engine)."""
    values = [v for k in results["engines"] for v in (
        results["engines"][k]["load_average_at_start"],
        results["engines"][k]["load_average_at_end"])]
    if len(values) <= 2:
        return ""
    return (f"Over the engines' runs the 1-minute load average ranged from {min(values)} to "
            f"{max(values)}. ")


def lora_ops(figures: dict[str, Any]) -> str:
    """Which CPU LoRA ops a vLLM engine's server computed with, as its engine reported."""
    ops = figures.get("warm_up", {}).get("lora_ops")
    if ops == "grouped":
        return "lorafleet's grouped CPU LoRA ops (`vllm_plugin/`, the default)"
    if ops == "vllm":
        return "vLLM's own CPU LoRA ops (`LORAFLEET_VLLM_CPU_LORA_OPS=vllm`)"
    return "CPU LoRA ops not reported"


def engines_text(results: dict[str, Any]) -> str:
    e = results["engines"]
    vllm = [k for k in e if is_vllm(e[k])]
    parts = [f"*{label(results, k)}*: " + (f"`{RANK}={e[k]['settings'][RANK]}`"
                                           if RANK in e[k]["settings"]
                                           else f"`{RANK}` unset, so {rank(e[k])} on this "
                                           "CPU host, the smallest that covers the adapters")
             + ", " + lora_ops(e[k]) for k in vllm]
    out = ""
    if vllm:
        out = (f"lorafleet on vLLM {results['versions'].get('vllm_server', '?')} "
               "(`LORAFLEET_ENGINE_BACKEND=vllm`; float32, eager, `--max-loras 8`; vLLM binds "
               "one OpenMP thread to one core and keeps the other for its front end; "
               + "; ".join(parts) + ")")
    if "builtin" in e:
        out += ("; and " if out else "") + (
            "the built-in engine (`LORAFLEET_ENGINE_BACKEND=builtin`: peft mixed-adapter "
            f"batches, {results['threads']} torch thread)")
    return out


def markdown(results: dict[str, Any]) -> str:
    e = results["engines"]
    vllm_env = ", ".join(f"{k} {v}" for k, v in results["versions"]["vllm_env"].items())
    short = results.get("short_max_tokens", 8)
    lines = [
        SECTION, "",
        f"`{command(results['command'])}` ({results['date']}, "
        f"{results['duration_s'] / 60:.1f} min). "
        f"Machine: {results['machine']}; vLLM environment: {vllm_env or 'none'}. Load "
        f"average (1, 5, 15 min) {loads(results['load_average_at_start'])} at the start and "
        f"{loads(results['load_average_at_end'])} at the end (1 min, per engine: "
        + "; ".join(f"{label(results, k)} {e[k]['load_average_at_start']} → "
                    f"{e[k]['load_average_at_end']}" for k in e)
        + f"). {results.get('note') or 'The machine was shared with other work.'} "
        + spread(results) + "Wall-clock figures are noisy; compare figures within this run, "
        "and engines measured at similar loads.", "",
        f"Model: Phi built from a config, {results['model_parameters'] / 1e6:.1f}M parameters "
        f"({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads of 64), random weights; {results['adapters']} "
        f"random LoRA adapters, r={LORA_RANK} on {', '.join(LORA_TARGETS)}, each a succeeded "
        "job's fine-tuned model with the worker's parity probe (vLLM replayed and passed all "
        "of them before anything was timed). Requests go through the API over HTTP "
        "(`lorafleet api` → `lorafleet serve` → vLLM's server or the built-in engine), "
        "streamed, greedy, raw prompts of 80–164 characters, "
        f"{results['max_tokens']} new tokens each. Engines: {engines_text(results)}. "
        "*One at a time*: the same requests, each sent when the previous one ended, on the "
        "same engine. Concurrent runs: the run of median wall time of "
        f"{results['repeats']}, adapters and base model alternating.", "",
        *run_rows(results), "", *cpu_text(results), *goal_rows(results["goals"]), "",
        "Continuous batching: a batch of long requests over the adapters, then, once every one "
        f"of them streams, one request of {short} tokens, {results.get('idle_shorts', 3)} "
        "times one after the other while the batch runs, and as many times on the idle "
        "engine (medians; *short ended at*: the last one; the built-in engine runs the "
        "batch to its end first, so it gets one).", "",
        "| Engine | Long batch | Short sent at | TTFT busy / idle ms | "
        "Latency busy / idle ms | Short ended at | Batch ended at |",
        "|---|---|---|---|---|---|---|"]
    for key in e:
        c = e[key]["continuous"]
        lines.append(
            f"| {label(results, key)} | {c['long_requests']} × {c['long_tokens_mean']:.0f} "
            f"tokens (min {c['long_tokens_min']}){ran_as(c)} | {c['short_sent_after_s']} s | "
            f"{c['short_ttft_ms']} / {c['idle_short_ttft_ms']} | {c['short_latency_ms']} / "
            f"{c['idle_short_latency_ms']} | {c['short_done_after_s']} s | "
            f"{c['batch_seconds']} s |")
    for key in [k for k in e if "status_poll" in e[k]]:
        lines += ["", poll_text(results, key), "", *poll_rows(e[key]["status_poll"])]
    lines += ["", explain(results), ""]
    return "\n".join(lines)


def cpu_text(results: dict[str, Any]) -> list[str]:
    """The CPU table with its lead-in and a blank line after ([] without figures)."""
    rows = cpu_rows(results)
    if not rows:
        return []
    return ["CPU seconds each process used during those runs (user + system, from /proc; "
            "*clients*: the benchmark's own process, whose event loop runs the clients; "
            "*vLLM engine core*: the processes the vLLM server started):", "", *rows, ""]


def poll_text(results: dict[str, Any], key: str) -> str:
    """How the status polls were measured, and the console's requests replayed."""
    s = results["engines"][key]["status_poll"]
    console = s.get("console", {})
    pair = (" (then the same pair with the web console's requests replayed)"
            if "busy_console" in s else "")
    out = (f"Status polls on {label(results, key)}: `GET /v1/fine_tuning/jobs/{{id}}` every "
           f"20 ms, {s['windows']} rounds of an idle and a saturated window of "
           f"{s['window_seconds']} s each{pair}; saturated: {s['load_clients']} clients (a "
           f"separate process) sending {results['max_tokens']}-token completions over the "
           f"adapters through the API ({s['completions']} answered).")
    if "replayed" not in console:
        return out + f" Console: {console.get('source', 'not measured')}."
    return out + (
        f" The console: its job page's API requests, {console['source']} over "
        f"{console['period_s']} s on the idle engine before anything was timed "
        f"({console['requests']} requests: {request_kinds(console['schedule'])}), then "
        "replayed over HTTP at their times, one after the other as the page sends them, by a "
        "client in a process of its own, repeated every "
        f"{console['period_s']} s, from the start of each pair of windows to its end "
        f"({console['replayed']} requests in {console['seconds_open']} s). Chromium itself "
        "was closed by then: kept open during the windows (as in this benchmark's first "
        "version), its renderer and compositor take CPU from the API on the same two cores, "
        "so that figure mixed the browser's own CPU use into the API's latency; the replay "
        "puts on the API exactly the requests the console makes, and nothing else.")


def request_kinds(schedule: list[list[Any]] | list[tuple[float, str]]) -> str:
    """'4 × job, 1 × events' from a schedule of (time, path)."""
    counts: dict[str, int] = {}
    for _, path in schedule:
        tail = str(path).split("?")[0].rstrip("/").split("/")
        kind = tail[-1] if tail[-1] in ("events", "checkpoints") else "job"
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} × {kind}" for kind, n in counts.items())


def explain(results: dict[str, Any]) -> str:
    """A few sentences on what the figures mean, with this run's numbers."""
    e = results["engines"]
    vllm = [k for k in e if is_vllm(e[k])]
    out = ["What the figures mean. API, engine (with vLLM's server) and the benchmark's "
           "clients share the two cores with whatever else ran (the load average): every "
           "streamed token is relayed by Python processes (on vLLM: its HTTP front end, the "
           "engine and the API) that take CPU from the one generating. p99 of "
           f"{results['requests']} requests is their slowest."]

    def ab(k: str) -> float:
        return float(e[k]["concurrent"]["wall_s"] / e[k]["concurrent_base"]["wall_s"])

    if vllm and "builtin" in e:
        b = e["builtin"]
        out.append(
            "Adapter rows are what decides here: vLLM's CPU LoRA ops compute at "
            "`--max-lora-rank` whatever the adapter's rank, and vLLM's own (PunicaWrapperCPU) "
            "copy each token's adapter weights (`bench/cpu_lora.py`): adapter rows took the "
            "base rows' time times "
            + ", ".join(f"{ab(k):.1f} ({label(results, k)})" for k in vllm)
            + f" (peft's mixed batches in the built-in engine: {ab('builtin'):.1f}x). On the "
            "base model alone: " + ", ".join(f"{e[k]['concurrent_base']['tokens_per_s']} "
                                             f"({label(results, k)})" for k in vllm)
            + f" and {b['concurrent_base']['tokens_per_s']} tok/s (built-in); on one CPU core "
            "a batch's matrix products are compute-bound, so batching gains far less than on "
            "a GPU.")
        shares = [(k, relay_share(e[k]["concurrent"])) for k in vllm]
        if all(v is not None for _, v in shares):
            out.append(
                f"Of the CPU the {results['requests']} concurrent requests over the adapters "
                "used, the hops (the API, the engine and vLLM's HTTP front end, each parsing "
                "and writing every streamed chunk) took "
                + ", ".join(f"{v:.0%} ({label(results, k)})" for k, v in shares)
                + "; the rest is vLLM's engine core, which generates, and the clients.")
        out.append(
            "One at a time, each request on vLLM pays vLLM's scheduler on every step and one "
            "more HTTP hop (engine → vLLM): "
            + ", ".join(f"{e[k]['sequential']['tokens_per_s']} tok/s ({label(results, k)})"
                        for k in vllm)
            + f" vs {b['sequential']['tokens_per_s']} on the built-in engine.")
        spin = spinning(results, vllm[0])
        if spin:
            out.append(spin)
        c, cb = e[vllm[0]]["continuous"], b["continuous"]
        out.append(
            "Continuous batching: vLLM admits a new request into the running batch: the "
            f"short request ended {'before' if c['short_before_batch_end'] else 'after'} the "
            f"long batch ({label(results, vllm[0])}: with "
            f"{c['long_still_generating_when_short_done']} of {c['long_requests']} long "
            "requests still generating), and its TTFT is the hops plus a step of the whole "
            "batch rather than of one row. The built-in engine runs a batch to its end before "
            "it starts the next: there the short request waited for the batch (TTFT "
            f"{cb['short_ttft_ms']} ms vs {cb['idle_short_ttft_ms']} idle).")
        concurrent = b["concurrent"].get("batch_requests")
        if concurrent and len(concurrent) > 1:
            out.append(
                "The built-in engine starts a batch `LORAFLEET_BATCH_WINDOW_MS` (10 ms) after "
                "its first request: requests sent at once but forwarded one by one by the API "
                "did not all make it in (the reported concurrent run ran as batches of "
                f"{' + '.join(map(str, concurrent))} requests, the long batch and the short "
                f"request as {' + '.join(map(str, cb.get('batch_requests', [])))}), which "
                "costs it throughput and makes late requests wait for a whole batch.")
    for key in [k for k in e if "status_poll" in e[k]]:
        s = e[key]["status_poll"]
        out.append(
            f"Status polls ({label(results, key)}): p99 {s['idle']['p99_ms']} ms idle, "
            f"{s['busy']['p99_ms']} ms saturated ({s['p99_ratio']}x; p50 "
            f"{s['idle']['p50_ms']} and {s['busy']['p50_ms']} ms).")
        if "console_vs_without" in s:
            out.append(console_text(s))
    if "status_poll" in e.get("vllm", {}) and "status_poll" in e.get("vllm-normal", {}):
        out.append(scheduling_text(results))
    return " ".join(out)


def scheduling_text(results: dict[str, Any]) -> str:
    """What scheduling vLLM's model processes with SCHED_IDLE did, against normal priority."""
    idle, normal = results["engines"]["vllm"], results["engines"]["vllm-normal"]
    a, b = idle["status_poll"], normal["status_poll"]
    return (
        "A slow poll is one that waits for a core: the API process shares the two with vLLM's "
        "engine core and worker, its HTTP front end, the engine's relay and the load clients. "
        "By default lorafleet's vLLM plugin schedules the processes that run the model with "
        "Linux's SCHED_IDLE (`LORAFLEET_VLLM_CPU_SCHEDULING=idle`), so that any other process "
        "that wakes up gets a core at once; at normal priority the saturated p99 was "
        f"{b['busy']['p99_ms']} ms ({b['p99_ratio']}x idle) against {a['busy']['p99_ms']} ms "
        f"({a['p99_ratio']}x), in the same run. It costs the model no throughput here: "
        f"{tps_of(idle)} tok/s for the 32 concurrent requests with SCHED_IDLE, "
        f"{tps_of(normal)} at normal priority (the CPU time it gives up is what the relays "
        "and clients need to keep it fed).")


def tps_of(engine: dict[str, Any]) -> Any:
    return engine["concurrent"]["tokens_per_s"]


def spinning(results: dict[str, Any], key: str) -> str:
    """What vLLM's own processes used one request at a time against the same tokens
    generated concurrently ('' without CPU figures)."""
    e = results["engines"][key]
    one, many = e["sequential"].get("cpu_s"), e["concurrent"].get("cpu_s")
    if not one or not many or not many.get("vllm_core"):
        return ""
    cores = results.get("cores") or 2
    busy = one["vllm_core"] / (e["sequential"]["wall_s"] * cores)
    return (
        f"One at a time, vLLM's engine core and its worker used {one['vllm_core']:.1f} CPU "
        f"seconds ({busy:.0%} of the {cores} cores over the run; {label(results, key)}) for "
        f"the tokens that took them {many['vllm_core']:.1f} concurrently: between steps each "
        "waits for the other by spinning (vLLM's shared-memory queue polls for 1 s after each "
        "message before it sleeps), so on a small CPU host a lightly loaded vLLM still keeps "
        "the cores busy and the relays and the API wait for them.")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def console_text(s: dict[str, Any]) -> str:
    """What the console's replayed requests did to the status polls."""
    c, busy, both = s["console"], s["busy"], s["busy_console"]
    out = (f"With the console's requests replayed: p99 {s['idle_console']['p99_ms']} ms idle, "
           f"{both['p99_ms']} ms saturated ({s['console_vs_without']}x the saturated figure "
           f"without them; p50 {both['p50_ms']} vs {busy['p50_ms']} ms). The page sent "
           f"{c['replayed']} requests in {c['seconds_open']} s, against some 50 a second "
           "from the poller.")
    if s["console_vs_without"] <= CONSOLE_CLOSE:
        return out
    rank_from_top = max(1, busy["polls"] - round(0.99 * (busy["polls"] - 1)))
    return out + (
        f" The difference is in the tail: p99 of {busy['polls']} polls is the "
        f"{ordinal(rank_from_top)} slowest, so a few polls that arrive while the API answers "
        "one of the page's requests on a saturated CPU (or a few that any other process on "
        "this shared machine delays) move it; one run does not tell these apart.")


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
