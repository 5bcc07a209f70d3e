"""Quality on a real pretrained model: does lorafleet's fast training path teach SmolLM2-135M as
much as the seed recipe does, and how far beyond the base model does it get?

``python -m bench.quality`` (``--quick``: a CI-sized run of a few minutes). For each prompt
format (``dolly``, ``phi2-qa``) both sides train a LoRA adapter on the same DialogSum records,
in the same order, for the same optimizer steps:

- **recipe**: the seed recipe (:func:`bench.recipe.train_recipe`): padded batches,
  labels = input_ids (the loss on the dialogue as well as the summary);
- **lorafleet**: a job's defaults (:func:`bench.throughput.train_lorafleet`): packing, the loss
  on the response only, the LM head on the labeled positions only.

Then the base model and both adapters summarize the first N DialogSum test dialogues whose
prompt fits ``max_length`` (greedy, at most ``max_new_tokens`` tokens, stopping at the format's
end marker, as :mod:`worker.evaluation` does for a job's evaluation card), scored with ROUGE-1/2/L
F1 (``rouge-score``, stemmed). The base model is asked twice: with the very prompt the adapters
get, and with its own chat template (user message: the instruction, a blank line, the
dialogue), which suits an instruction-tuned model better. Training tokens/s come from the same
run. ``--write`` puts the tables into BENCHMARKS.md's "Quality on a pretrained model" section.

The data is read from the DialogSum folder (``$LORAFLEET_DIALOGSUM_DIR``, default
``../shared/data/dialogsum``); the model is pulled once into ``~/.cache/lorafleet/models``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import report, throughput, workload
from bench.recipe import Hyper, RunResult, train_recipe
from shared.records import DEFAULT_INSTRUCTION
from shared.samples import SAMPLE_PATH, dialogsum_path
from shared.templates import PromptFormat

OUT = Path(__file__).resolve().parent / "out" / "quality"
MODELS = Path.home() / ".cache" / "lorafleet" / "models"
SECTION = "Quality on a pretrained model"
FORMATS = ("dolly", "phi2-qa")
ROUGE = ("rouge1", "rouge2", "rougeL")
# The goals: lorafleet's speed costs no quality, and the fine-tune clearly helps.
GOAL_MARGIN_OVER_BASE = 0.08
GOAL_SPEEDUP = 1.5


@dataclass(frozen=True)
class Plan:
    """The size of one run."""

    name: str
    hyper: Hyper
    test_dialogues: int
    max_new_tokens: int


# lr 2e-4 is a job's default; r 16 / alpha 32 the shape measured through the service.
_HYPER = Hyper(steps=80, batch_size=4, grad_accum=1, max_length=512, learning_rate=2e-4,
               warmup=2, seed=42, lora_r=16, lora_alpha=32, lora_dropout=0.05)
FULL = Plan("full", _HYPER, test_dialogues=100, max_new_tokens=64)
QUICK = Plan("quick", replace(_HYPER, steps=4), test_dialogues=4, max_new_tokens=24)


@dataclass
class FormatOutcome:
    """One format's runs and scores."""

    fmt: str
    runs: dict[str, RunResult]  # "recipe", "lorafleet"
    scores: dict[str, Any]  # "base, chat template", "base, same prompt", "recipe", "lorafleet"


@dataclass
class Outcome:
    plan: Plan
    data: str
    test_examples: int
    threads: int
    loads: tuple[str, str]
    formats: list[FormatOutcome] = field(default_factory=list)
    techniques: str = ""


# --------------------------------------------------------------------------- the pieces
@contextlib.contextmanager
def prompt_format(fmt: PromptFormat) -> Iterator[None]:
    """Train both sides in ``fmt``: the recipe renders records with ``bench.workload.FORMAT``
    and lorafleet's side builds its job with ``bench.throughput.FORMAT``; both are swapped for
    the duration (they are the throughput benchmark's single ``dolly`` format otherwise)."""
    saved = workload.FORMAT, throughput.FORMAT
    workload.FORMAT = throughput.FORMAT = fmt
    try:
        yield
    finally:
        workload.FORMAT, throughput.FORMAT = saved


def the_format(name: str) -> PromptFormat:
    return PromptFormat(type=name, instruction=DEFAULT_INSTRUCTION)  # type: ignore[arg-type]


def test_examples(model_dir: Path, fmt: PromptFormat, plan: Plan) -> tuple[Any, list[Any]]:
    """The model's text side and the first test dialogues whose prompt fits, in ``fmt``."""
    from modelio.model_text import ModelText
    from shared.schemas import LoraSpec, TrainingSpec
    from worker.evaluation import load_examples

    text = ModelText(str(model_dir))
    spec = TrainingSpec(
        model=str(model_dir), training_file="-", lora=LoraSpec(), prompt_format=fmt,
        max_length=plan.hyper.max_length, n_epochs=1, batch_size=1,
        gradient_accumulation_steps=1, learning_rate=1e-4, warmup=0, save_steps=1,
        logging_steps=1, train_on_inputs=False, packing=True, seed=0)
    examples = load_examples(dialogsum_path("test"), spec, text, plan.test_dialogues,
                             plan.max_new_tokens)
    return text, examples


def answer(model: Any, text: Any, fmt: PromptFormat, examples: list[Any],
           max_new_tokens: int) -> list[str]:
    from shared.templates import stop_sequences
    from worker.evaluation import generate_answers

    stop_ids = sorted(text.eos_ids | (text.chat_end_ids() if fmt.type == "chat"
                                       else frozenset()))
    return generate_answers(model, text.tokenizer, examples, max_new_tokens=max_new_tokens,
                            stop_ids=stop_ids, stops=stop_sequences(fmt))


def score_all(model_dir: Path, adapters: dict[str, Path], fmt: PromptFormat, plan: Plan,
              log: Any) -> tuple[dict[str, Any], int]:
    """ROUGE of the base model (with ``fmt``'s prompt) and of each adapter; the model loads
    once, the adapters sit side by side on it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.evaluation import score

    text, examples = test_examples(model_dir, fmt, plan)
    refs = [e.reference for e in examples]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    scores: dict[str, Any] = {}
    t0 = time.perf_counter()
    with model.disable_adapter():
        scores["base, same prompt"] = score(
            answer(model, text, fmt, examples, plan.max_new_tokens), refs)
    log(f"    base, {fmt.type} prompt: ROUGE-L {scores['base, same prompt'].rougeL:.3f} "
        f"({time.perf_counter() - t0:.0f} s)")
    for name in names:
        t0 = time.perf_counter()
        model.set_adapter(name)
        scores[name] = score(answer(model, text, fmt, examples, plan.max_new_tokens), refs)
        log(f"    {name}: ROUGE-L {scores[name].rougeL:.3f} ({time.perf_counter() - t0:.0f} s)")
    return scores, len(examples)


def score_chat_base(model_dir: Path, plan: Plan, log: Any) -> Any:
    """The base model asked in its own chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.evaluation import score

    fmt = PromptFormat(type="chat", instruction=DEFAULT_INSTRUCTION)
    text, examples = test_examples(model_dir, fmt, plan)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    result = score(answer(model, text, fmt, examples, plan.max_new_tokens),
                   [e.reference for e in examples])
    log(f"    base, chat template: ROUGE-L {result.rougeL:.3f} ({time.perf_counter() - t0:.0f} s)")
    return result


def techniques(model_dir: Path) -> str:
    """Which of lorafleet's training techniques apply to this model, asked of the functions a
    job's model setup calls."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.attention import use_packed_attention
    from worker.last_layer import run_last_layer_on_loss_positions
    from worker.training.model import fuse_tanh_gelu

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    kind = model.config.model_type
    applied = ["packing (no padding)",
               "the LM head and the loss on the labeled (response) positions only"]
    if use_packed_attention(model):
        applied.insert(1, "per-sample attention of packed rows (SDPA per sample)")
    skipped: list[str] = []
    (applied if run_last_layer_on_loss_positions(model) else skipped).append(
        "the last layer on the labeled positions only (Phi's parallel layer)")
    (applied if fuse_tanh_gelu(model) else skipped).append(
        "the fused tanh-GELU (its MLP uses SiLU)" if kind != "phi" else "the fused tanh-GELU")
    return (f"On this {kind} model lorafleet's side gets {', '.join(applied)}; not "
            f"{' nor '.join(skipped) or 'anything else'}.")


# --------------------------------------------------------------------------- the run
def run(plan: Plan, work: Path, models_dir: Path, formats: tuple[str, ...],
        log: Any = print) -> Outcome:
    import torch
    from transformers import AutoTokenizer

    from cli.models import pull_model

    model_dir = pull_model("smollm2-135m", models_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    hp = plan.hyper
    if dialogsum_path("train") == SAMPLE_PATH:
        log("  DialogSum is not there: training and testing on the bundled synthetic sample")
    # Chosen in the longer format (dolly), so that the same records fit in both.
    with prompt_format(the_format("dolly")):
        train_file, skipped = workload.select_examples(
            tokenizer, "train", hp.examples, hp.max_length, work / "data" / f"train-{plan.name}"
            ".jsonl", allow_fewer=True)
    outcome = Outcome(plan, "", 0, torch.get_num_threads(), (report.load(), ""))
    outcome.data = (
        f"DialogSum train: the first {hp.examples} records that fit max_length "
        f"{hp.max_length} ({skipped} longer ones passed over); {hp.steps} optimizer steps × "
        f"batch {hp.batch_size} (one epoch, the same records in the same order on both sides), "
        f"seed {hp.seed}, lr {hp.learning_rate:g}, warm-up {hp.warmup} steps, LoRA r "
        f"{hp.lora_r} / alpha {hp.lora_alpha:g} / dropout {hp.lora_dropout:g} on q, k, v, o, "
        "gate, up, down; fp32 on CPU")
    outcome.techniques = techniques(model_dir)
    chat_base = score_chat_base(model_dir, plan, log)
    for name in formats:
        fmt = the_format(name)
        log(f"  format {name}")
        runs: dict[str, RunResult] = {}
        with prompt_format(fmt):
            for side, train in (("recipe", _recipe), ("lorafleet", _lorafleet)):
                out = work / "runs" / f"{plan.name}-{name}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                runs[side] = train(model_dir, train_file, out, hp)
                log(f"    {side}: {runs[side].tokens_per_second:.1f} real tok/s "
                    f"({runs[side].real_tokens} tokens in {runs[side].train_seconds:.0f} s)")
        scores, n = score_all(model_dir, {k: r.adapter_dir for k, r in runs.items()}, fmt,
                              plan, log)
        outcome.test_examples = n
        outcome.formats.append(FormatOutcome(name, runs,
                                             {"base, chat template": chat_base, **scores}))
    outcome.loads = (outcome.loads[0], report.load())
    return outcome


def _recipe(model_dir: Path, train_file: Path, out: Path, hp: Hyper) -> RunResult:
    return train_recipe(model_dir, train_file, out, hp, label="recipe")


def _lorafleet(model_dir: Path, train_file: Path, out: Path, hp: Hyper) -> RunResult:
    return throughput.train_lorafleet(model_dir, train_file, out, hp, label="lorafleet",
                                      device="cpu")


# --------------------------------------------------------------------------- the report
def _f(x: float) -> str:
    return f"{x:.3f}"


def cpu_rate(run_: RunResult) -> float | None:
    """Real tokens per CPU second of the training loop (None: not measured)."""
    return run_.real_tokens / run_.cpu_seconds if run_.cpu_seconds > 0 else None


def markdown(outcome: Outcome, where: str) -> str:
    """The section of BENCHMARKS.md for one run."""
    plan = outcome.plan
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m bench.quality` ({plan.name} size, {report.stamp()}): SmolLM2-135M-Instruct "
        "(`lorafleet models pull smollm2-135m`: Llama architecture, 134.5 M parameters, the "
        "Q4_1 GGUF dequantized to float32) fine-tuned on DialogSum by the seed recipe and by "
        "lorafleet's job defaults at equal steps and data, then scored against the base model.",
        "",
        f"- Machine: {where}; {outcome.threads} torch thread(s); 1-min load average "
        f"{outcome.loads[0]} at the start, {outcome.loads[1]} at the end (shared machine).",
        f"- Data: {outcome.data}.",
        f"- Test: the first {outcome.test_examples} DialogSum test dialogues whose prompt fits "
        f"{plan.hyper.max_length} tokens; greedy, at most {plan.max_new_tokens} new tokens, "
        "stopping at the end-of-sequence token and the format's end marker; ROUGE-1/2/L F1 "
        "(`rouge-score`, stemmed) against the reference summary, averaged.",
        "- Base prompts: *same prompt* is exactly what the adapters are given (the format with "
        f"the instruction \"{DEFAULT_INSTRUCTION}\" and the dialogue as its input); *chat "
        "template* is SmolLM2's own chat template with one user message: the instruction, a "
        "blank line, the dialogue.",
        "- Throughput: real (non-padding) tokens per second of the training loop, same run; "
        "*tok/CPU-s* divides them by the process's CPU time over the same loop instead, which "
        "other work on a shared machine does not inflate (one torch thread).",
        f"- {outcome.techniques}",
        "",
    ]
    header = ["format", "model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "train tok/s", "× recipe",
              "tok/CPU-s", "× recipe (CPU)"]
    rows = []
    verdicts = []
    for fo in outcome.formats:
        recipe_tps = fo.runs["recipe"].tokens_per_second
        recipe_cpu = cpu_rate(fo.runs["recipe"])
        for name, sc in fo.scores.items():
            run_ = fo.runs.get(name)
            tps = run_.tokens_per_second if run_ else None
            cps = cpu_rate(run_) if run_ else None
            label = f"**{name}**" if name == "lorafleet" else name
            rows.append([f"`{fo.fmt}`", label, _f(sc.rouge1), _f(sc.rouge2), _f(sc.rougeL),
                         f"{tps:.1f}" if tps else "", f"{tps / recipe_tps:.2f}" if tps else "",
                         f"{cps:.1f}" if cps else "",
                         f"{cps / recipe_cpu:.2f}" if cps and recipe_cpu else ""])
        ours, recipe = fo.scores["lorafleet"], fo.scores["recipe"]
        best_base = max(fo.scores["base, chat template"].rougeL,
                        fo.scores["base, same prompt"].rougeL)
        speed = fo.runs["lorafleet"].tokens_per_second / recipe_tps
        ours_cpu = cpu_rate(fo.runs["lorafleet"])
        on_cpu = (f" ({ours_cpu / recipe_cpu:.2f}× per CPU second)"
                  if ours_cpu and recipe_cpu else "")
        verdicts.append(
            f"`{fo.fmt}`: lorafleet ROUGE-L {ours.rougeL:.3f} vs recipe {recipe.rougeL:.3f} "
            f"({'≥' if ours.rougeL >= recipe.rougeL else '<'} recipe), "
            f"{ours.rougeL - best_base:+.3f} over the better base prompt (goal ≥ "
            f"+{GOAL_MARGIN_OVER_BASE}), {speed:.2f}× the recipe's tokens/s{on_cpu} (goal ≥ "
            f"{GOAL_SPEEDUP}×)")
    lines += [report.table(header, rows), ""]
    lines += [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def write_section(md: str, path: Path = report.BENCHMARKS) -> None:
    """Replace (or add) the quality section of BENCHMARKS.md."""
    report.replace_section(SECTION, md, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"CI size: {QUICK.hyper.steps} steps, {QUICK.test_dialogues} test "
                        "dialogues")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (batch 4)")
    parser.add_argument("--test", type=int, default=None, help="test dialogues")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"both sides' (default {FULL.hyper.learning_rate:g}, a job's)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier figures on a shared machine; "
                        "0: torch's default)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--work", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    hyper = replace(plan.hyper, steps=args.steps or plan.hyper.steps,
                    learning_rate=args.learning_rate or plan.hyper.learning_rate)
    changed = args.steps or args.test or args.max_new_tokens or args.learning_rate
    plan = Plan("reduced" if changed else plan.name, hyper, args.test or plan.test_dialogues,
                args.max_new_tokens or plan.max_new_tokens)
    os.environ.setdefault("LORAFLEET_DEVICE", "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    where = report.machine()
    print(f"quality benchmark, {plan.name}: {hyper.steps} steps x batch {hyper.batch_size}, "
          f"{plan.test_dialogues} test dialogues\n  {where}", flush=True)
    started = time.monotonic()
    outcome = run(plan, args.work, args.models_dir, tuple(args.formats),
                  log=lambda m: print(m, flush=True))
    md = markdown(outcome, where)
    print(md)
    print(f"took {time.monotonic() - started:.0f} s")
    if args.write:
        write_section(md)
        print(f"wrote the '{SECTION}' section of {report.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
