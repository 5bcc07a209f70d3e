"""The benchmark's tables, and their place in BENCHMARKS.md.

BENCHMARKS.md has one ``## `` section per benchmark; this module rewrites only its own
(:data:`SECTION`) and leaves every other section as it finds it.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

SECTION = "Training throughput"
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    """CPU model and cores, memory, and the library versions that set the speed."""
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, peft "
            f"{peft.__version__}")


def load() -> str:
    """The 1-minute load average: other work on the machine slows every figure."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


TRAIN_KEY = "### Recipe (A) vs lorafleet (B)"
SERVICE_KEY = "### Service overhead"
_ORDER = [TRAIN_KEY, SERVICE_KEY]


def replace_section(title: str, md: str, path: Path = BENCHMARKS) -> None:
    """Replace (or add at the end) the ``## {title}`` section of ``path`` with ``md``, which
    starts with that heading; every other section stays as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    if found:
        text = text[:found.start()] + md.strip() + "\n\n" + text[found.end():]
    else:
        text = text.rstrip() + "\n\n" + md.strip() + "\n"
    path.write_text(text.rstrip() + "\n", encoding="utf-8")


def write_section(blocks: list[tuple[str, str]], path: Path = BENCHMARKS) -> None:
    """Put ``blocks`` (``(key, markdown)``, each markdown starting with its ``### `` title,
    which starts with the key) into the ``## Training throughput`` section of ``path``.

    Blocks of this run replace the ones with the same key; the section's other blocks (an
    earlier run's service figures, say) and every other ``## `` section stay as they are.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    kept: dict[str, str] = {}
    if found:
        for chunk in re.split(r"(?m)^(?=### )", found.group(0)):
            for key in _ORDER:
                if chunk.startswith(key):
                    kept[key] = chunk.strip()
    kept.update({key: md.strip() for key, md in blocks})
    body = "\n\n".join(kept[k] for k in _ORDER if k in kept)
    block = (f"## {SECTION}\n\nWritten by `make bench-full` (`python -m bench --full`); "
             f"`make bench` runs a CI-sized version.\n\n{body}\n")
    if found:
        text = text[:found.start()] + block + "\n" + text[found.end():]
        text = text.rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text, encoding="utf-8")

def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def training_tables(outcome: object, where: str, loads: tuple[str, str]) -> str:
    """Markdown for one training-throughput outcome (``bench.throughput.Outcome``)."""
    o = outcome  # typed loosely: keeps this module importable without torch
    a, b = o.a, o.b  # type: ignore[attr-defined]
    plan = o.plan  # type: ignore[attr-defined]
    rows = []
    for row in o.main:  # type: ignore[attr-defined]
        r = row.run
        pad = 1 - r.real_tokens / r.padded_tokens if r.padded_tokens else 0.0
        loss = row.losses
        rows.append([
            f"**{r.label}**", row.settings, str(r.steps), f"{r.real_tokens:,}",
            f"{pad:.0%}", _f(r.train_seconds), f"**{_f(r.tokens_per_second)}**",
            f"{r.tokens_per_second / a.run.tokens_per_second:.2f}",
            f"{loss.response:.4f}" if loss else "", f"{loss.all_tokens:.4f}" if loss else "",
        ])
    la, lb = a.losses, b.losses
    delta = (lb.response / la.response - 1) if la and lb else float("nan")
    parts = [
        f"### Recipe (A) vs lorafleet (B): {plan.name} mode, {stamp()}",
        "",
        f"- Machine: {where}; {o.threads} torch thread(s); 1-min load average {loads[0]} "  # type: ignore[attr-defined]
        f"at the start, {loads[1]} at the end (the machine may be shared: each side ran "
        f"{plan.repeats}× alternating, its fastest run is shown).",
        f"- Model: {o.model_desc}.",  # type: ignore[attr-defined]
        f"- Data: {o.data_desc}.",  # type: ignore[attr-defined]
        "- Throughput: real (non-padding) tokens per second of the training loop "
        "(`trainer.train()`, one checkpoint save included), same examples and order on both "
        "sides; B has one more token per example (the eos lorafleet appends).",
        f"- Validation loss: mean cross-entropy per token on the first "
        f"{plan.validation_examples} DialogSum validation dialogues that fit, the same inputs "
        "for every adapter (prompt and response tokenized apart, no eos). *response*: the "
        "summary and its end marker, each predicted from all before it (what the adapter is "
        "for); *all tokens*: the whole text (A's training objective).",
        "",
        table(["side", "settings", "steps", "real tokens", "padding", "train s", "real tok/s",
               "× A", "val loss (response)", "val loss (all tokens)"], rows),
        "",
        f"Before training (the base model, which is what a fresh LoRA adapter computes) the "
        f"same losses are {o.untrained.response:.4f} (response) and "  # type: ignore[attr-defined]
        f"{o.untrained.all_tokens:.4f} (all tokens).",  # type: ignore[attr-defined]
        "",
        f"**train-throughput ratio B/A: {o.ratio:.2f}** — B's response loss is "  # type: ignore[attr-defined]
        f"{delta:+.1%} vs A's (goal: ≥ 2.00×, loss not worse by more than 1%).",
    ]
    if o.techniques:  # type: ignore[attr-defined]
        thp = o.technique_hyper  # type: ignore[attr-defined]
        base = o.techniques[0].run.tokens_per_second  # type: ignore[attr-defined]
        trows = []
        seen: dict[str, float] = {}
        prev: tuple[str, float] | None = None
        for row in o.techniques:  # type: ignore[attr-defined]
            r = row.run
            pad = 1 - r.real_tokens / r.padded_tokens if r.padded_tokens else 0.0
            ref = (row.base, seen[row.base]) if row.base in seen else prev
            step = f"{r.tokens_per_second / ref[1]:.2f}" if ref else ""
            if ref and row.base in seen:  # not the row above: say which
                step += f" (vs {ref[0]})"
            trows.append([r.label, row.settings, f"{pad:.0%}", _f(r.tokens_per_second),
                          _f(r.steady_tokens_per_second), _f(r.first_step_seconds),
                          f"{r.tokens_per_second / base:.2f}", step])
            seen[r.label] = r.tokens_per_second
            prev = (r.label, r.tokens_per_second)
        parts += [
            "",
            f"#### One technique at a time ({thp.steps} steps × batch {thp.batch_size}, "
            f"fastest of {plan.repeats} alternating runs (torch.compile: one), same model "
            "and machine; each row adds one technique to the row it is compared with)",
            "",
            table(["variant", "settings", "padding", "real tok/s", "after step 1 tok/s",
                   "step 1 s", "× A", "× row above"], trows),
        ]
        if not any("compile" in row.run.label for row in o.techniques):  # type: ignore[attr-defined]
            parts += ["", "torch.compile is measured with `--compile` only: compiling "
                      "takes minutes on a small CPU, again for new packed lengths."]
    return "\n".join(parts)


def service_tables(outcome: object, where: str, loads: tuple[str, str]) -> str:
    """Markdown for ``bench.service.ServiceOutcome``."""
    import statistics

    o = outcome
    svc, direct = o.service_s, o.direct_s  # type: ignore[attr-defined]
    run_med = statistics.median(o.to_running)  # type: ignore[attr-defined]
    start_med = statistics.median(o.to_started)  # type: ignore[attr-defined]
    step_med = statistics.median(o.to_first_step)  # type: ignore[attr-defined]
    api = o.api  # type: ignore[attr-defined]
    bare, job = api["bare (async def)"], api["job status"]
    rows = [
        ["job through `lorafleet up` (submit → succeeded)",
         " / ".join(f"{x:.2f} s" for x in svc), f"{min(svc):.2f} s", ""],
        ["same job, training function called directly",
         " / ".join(f"{x:.2f} s" for x in direct), f"{min(direct):.2f} s", ""],
        ["**overhead (best / best)**", "", f"**{o.overhead:.2f}×**",  # type: ignore[attr-defined]
         "≤ 1.10×"],
        ["queue latency: submit → running (idle worker)",
         " / ".join(f"{x:.3f}" for x in o.to_running), f"median {run_med:.3f} s", ""],  # type: ignore[attr-defined]
        ["queue latency: submit → training starts (data and model loaded, step 1 begins)",
         " / ".join(f"{x:.3f}" for x in o.to_started),  # type: ignore[attr-defined]
         f"**median {start_med:.3f} s**", "≤ 1 s"],
        ["queue latency: submit → step 1 done and reported",
         " / ".join(f"{x:.3f}" for x in o.to_first_step),  # type: ignore[attr-defined]
         f"median {step_med:.3f} s", ""],
    ]
    arows = [[name, f"{v['rps']:,.0f}", f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}",
              f"{v['requests']:,.0f}", f"{v['errors']:.0f}"] for name, v in api.items()]
    ratio = job["rps"] / bare["rps"]
    ttl = o.status_cache_seconds  # type: ignore[attr-defined]
    uncached = api.get("job status (status cache off)")
    off = (f"; with the status cache off: {uncached['rps'] / bare['rps']:.2f}×"
           if uncached else "")
    return "\n".join([
        f"{SERVICE_KEY} and API under training load ({stamp()})",
        "",
        f"- Machine: {where}; 1-min load average {loads[0]} at the start, {loads[1]} at the "
        "end. Service: SQLite database and the embedded filesystem broker (what `lorafleet "
        "up` uses with no settings), `lorafleet up --no-engine` (no inference engine).",
        f"- Job: the quick mode's model, {o.job_desc}. Direct: `load_tokenizer` + "  # type: ignore[attr-defined]
        "`prepare` + `train_adapter` in a warm process, cold preprocessing cache (as the job).",
        "",
        table(["measure", "runs", "result", "goal"], rows),
        "",
        f"API: {o.clients} concurrent keep-alive clients, {o.api_seconds:.0f} s per endpoint, "  # type: ignore[attr-defined]
        "twice each, alternating, while a job trained; the bare endpoint (`GET /bench/bare`, "
        "async, constant body, no key) is served by the same process as the job route. The "
        "job-status route runs as deployed: API keys cached "
        f"(`LORAFLEET_AUTH_CACHE_SECONDS`) and answers cached for {ttl:g} s "
        "(`LORAFLEET_STATUS_CACHE_SECONDS`, the default; a worker's update shows within it, "
        "a cancel through the API at once). *status cache off*: the same GET on a second API "
        "process of the same service with that setting at 0 (keys still cached). The queue "
        "latencies above are what a client polling that route sees, so they include up to "
        f"{ttl:g} s of that cache.",
        "",
        table(["endpoint", "req/s", "p50 ms", "p99 ms", "requests", "errors"], arows),
        "",
        f"**job-status GET throughput / bare async endpoint: {ratio:.2f}×** (goal ≥ 0.5×)"
        f"{off}",
    ])
