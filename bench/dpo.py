"""Does a DPO job teach a real model to prefer what it is told to? ``python -m bench.dpo``
(``--quick``: a CI-sized run of a few minutes).

SmolLM2-135M-Instruct (``lorafleet models pull smollm2-135m``) summarizing DialogSum, asked in
its chat template ("Summarize the below conversation." and the dialogue). Preference pairs:
preferred = the reference summary, non-preferred = the base model's own greedy answer to the
same request (it tends to echo the dialogue). The base answers are generated once and cached.

Two runs, each as the worker runs a job (``method_for(spec).prepare`` + ``train_adapter``):

- **DPO**: a DPO job on the training pairs, a fresh adapter (the reference is the base model);
- **SFT → DPO**: a supervised job on the same dialogues with their reference summaries, then a
  DPO job that continues its adapter (the reference is the SFT policy).

On held-out pairs (DialogSum validation), each model is scored with the **preference
accuracy**: the share of pairs whose policy log-ratio of preferred over non-preferred is above
the reference's, log π(y_w) − log π(y_l) > log π_ref(y_w) − log π_ref(y_l) (a model that is its
own reference scores 0: every margin is 0); beside it the share where the model itself finds the
preferred answer more likely. And with **ROUGE-L** (F1, stemmed) of its greedy answers on the
held-out dialogues against the reference summaries. Goals: DPO's preference accuracy ≥ 0.8 and
its ROUGE-L ≥ the base model's + 0.05. ``--write`` puts the section into BENCHMARKS.md.

The data is read from the DialogSum folder (``$LORAFLEET_DIALOGSUM_DIR``, default
``../shared/data/dialogsum``), never copied into the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from shared.records import DEFAULT_INSTRUCTION
from shared.samples import SAMPLE_PATH, dialogsum_path

OUT = Path(__file__).resolve().parent / "out" / "dpo"
MODELS = Path.home() / ".cache" / "lorafleet" / "models"
SECTION = "Preference tuning (DPO)"
GOAL_ACCURACY = 0.8
GOAL_ROUGE_MARGIN = 0.05


@dataclass(frozen=True)
class Plan:
    """The size of one run."""

    name: str
    train_pairs: int
    held_out: int
    max_prompt_tokens: int  # dialogues whose request is longer are passed over (CPU time)
    max_new_tokens: int  # of every greedy answer (the non-preferred ones and the scored ones)
    dpo_epochs: float
    sft_epochs: float


FULL = Plan("full", train_pairs=200, held_out=50, max_prompt_tokens=160, max_new_tokens=48,
            dpo_epochs=1, sft_epochs=1)
QUICK = Plan("quick", train_pairs=8, held_out=4, max_prompt_tokens=160, max_new_tokens=16,
             dpo_epochs=1, sft_epochs=1)
# A job's settings besides the method: batches of 4, LoRA r 16 on the projections, the chat
# format, each method's default learning rate (learning_rate_multiplier 1).
BATCH_SIZE = 4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
SEED = 42


@dataclass
class Scores:
    accuracy: float | None  # the preference accuracy (policy vs its reference)
    prefers: float  # share of pairs where the model finds the preferred answer more likely
    rouge_l: float


@dataclass
class Outcome:
    plan: Plan
    data: str = ""
    threads: int = 1
    loads: tuple[str, str] = ("", "")
    scores: dict[str, Scores] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the data
def request(dialogue: str) -> list[dict[str, str]]:
    """The one user message a pair's input holds: what the chat format renders for a DialogSum
    record with the default instruction."""
    return [{"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n{dialogue}"}]


def select(text: Any, split: str, n: int, max_prompt_tokens: int,
           skip: set[str] | None = None) -> list[dict[str, Any]]:
    """The first ``n`` records of ``split`` whose request fits ``max_prompt_tokens``."""
    out: list[dict[str, Any]] = []
    with dialogsum_path(split).open(encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            if skip and record["dialogue"] in skip:
                continue
            prompt = text.render_chat(request(record["dialogue"]), True)
            if len(text.encode(prompt)) <= max_prompt_tokens:
                out.append(record)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} {split} records fit {max_prompt_tokens} tokens")
    return out


def base_answers(model_dir: Path, text: Any, records: list[dict[str, Any]], plan: Plan,
                 cache: Path, log: Any) -> list[str]:
    """The base model's greedy answers to the records' requests, cached by model, requests
    and length (minutes of CPU otherwise, each run)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([str(model_dir), plan.max_new_tokens,
                                     [r["dialogue"] for r in records]]).encode()).hexdigest()
    path = cache / f"base-answers-{key[:20]}.json"
    if path.is_file():
        log(f"  base answers: cached ({path.name})")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = generate(model, text, [request(r["dialogue"]) for r in records],
                       plan.max_new_tokens)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers))
    log(f"  base answers: {len(answers)} generated in {time.perf_counter() - t0:.0f} s")
    return answers


def generate(model: Any, text: Any, requests: list[list[dict[str, str]]],
             max_new_tokens: int) -> list[str]:
    """Greedy answers as a job's evaluation makes them (worker.evaluation)."""
    from worker.evaluation import EvalExample, generate_answers

    examples = [EvalExample(text.encode(text.render_chat(m, True)), "") for m in requests]
    stops = sorted(text.eos_ids | text.chat_end_ids())
    return generate_answers(model, text.tokenizer, examples, max_new_tokens=max_new_tokens,
                            stop_ids=stops, stops=[])


def pair(record: dict[str, Any], rejected: str) -> dict[str, Any]:
    return {"input": {"messages": request(record["dialogue"])},
            "preferred_output": [{"role": "assistant", "content": record["summary"]}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> tuple[Path, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the jobs
def job_spec(model_dir: Path, method: str, epochs: float, rpo_alpha: float | None = None,
             **extra: Any) -> Any:
    """A job's spec as the API builds it for these settings (each method's default rate)."""
    from shared.methods import DEFAULT_BETA, base_learning_rate
    from shared.schemas import DpoSpec, LoraSpec, TrainingSpec
    from shared.templates import PromptFormat

    return TrainingSpec(
        model=str(model_dir), training_file="-", lora=LoraSpec(**LORA),
        prompt_format=PromptFormat(type="chat", instruction=DEFAULT_INSTRUCTION),
        max_length=512, n_epochs=epochs, batch_size=BATCH_SIZE, gradient_accumulation_steps=1,
        learning_rate=base_learning_rate(method), warmup=0, save_steps=10_000,
        logging_steps=10, train_on_inputs=False, packing=method == "supervised",
        seed=SEED, method=method,
        dpo=DpoSpec(beta=DEFAULT_BETA, rpo_alpha=rpo_alpha) if method == "dpo" else None,
        **extra)


STAGES = ("dpo", "sft", "sft-dpo", "score")


def train(spec: Any, files: tuple[Path, str], out: Path, log: Any,
          run_it: bool = True) -> tuple[Path, float]:
    """One job's training, as the worker runs it; the adapter folder and the loop's seconds.
    ``run_it`` false: the adapter an earlier run of this stage left in ``out``."""
    from modelio.loading import load_tokenizer
    from worker.training import method_for, train_adapter

    if not run_it:
        done = out / "seconds.json"
        seconds = json.loads(done.read_text())["train_seconds"] if done.is_file() else math.nan
        log(f"  {out.name}: the adapter of an earlier run ({out / 'adapter'})")
        return out / "adapter", float(seconds)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(spec.model)
    data = method_for(spec).prepare(spec, tokenizer, *files)
    result = train_adapter(spec, tokenizer, data, out / "checkpoints", out / "adapter",
                           device="cpu")
    assert result.adapter_dir is not None
    log(f"  {spec.method}: {result.step} steps, {data.examples} examples "
        f"({data.dropped_too_long} too long), {result.train_seconds:.0f} s training, "
        f"{time.perf_counter() - started:.0f} s in all")
    (out / "seconds.json").write_text(json.dumps({"train_seconds": result.train_seconds}))
    return result.adapter_dir, result.train_seconds


# --------------------------------------------------------------------------- the scores
def pair_logps(model: Any, rows: Any) -> tuple[list[float], list[float]]:
    """Summed log-probabilities of each pair's preferred and non-preferred answer given its
    prompt (token ids as the job tokenized them)."""
    import torch

    chosen, rejected = [], []
    with torch.inference_mode():
        for row in rows:
            for answer, out in ((row["chosen_ids"], chosen), (row["rejected_ids"], rejected)):
                ids = torch.tensor([row["prompt_ids"] + answer])
                logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1:-1].float()
                logps = torch.log_softmax(logits, dim=-1)
                out.append(float(logps.gather(-1, torch.tensor(answer)[:, None]).sum()))
    return chosen, rejected


def scores(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]],
           answers: list[str], summaries: list[str]) -> Scores:
    from worker.evaluation import score

    (pw, pl), (rw, rl) = policy, reference
    margins = [(a - b) - (c - d) for a, b, c, d in zip(pw, pl, rw, rl, strict=True)]
    return Scores(accuracy=sum(m > 0 for m in margins) / len(margins),
                  prefers=sum(a > b for a, b in zip(pw, pl, strict=True)) / len(pw),
                  rouge_l=score(answers, summaries).rougeL)


# --------------------------------------------------------------------------- the run
def run(plan: Plan, work: Path, models_dir: Path, log: Any = print,
        rpo_alpha: float | None = None, stages: tuple[str, ...] = STAGES) -> Outcome:
    """The benchmark's ``stages`` (a stage left out reuses what an earlier run of it left in
    ``work``: processes may train the stages side by side); no scores without ``score``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cli.models import pull_model
    from modelio.loading import load_tokenizer
    from modelio.model_text import ModelText
    from shared import storage
    from shared.settings import get_settings
    from shared.storage import folders
    from worker.training import method_for

    outcome = Outcome(plan, threads=torch.get_num_threads())
    outcome.loads = (report.load(), "")
    model_dir = pull_model("smollm2-135m", models_dir)
    # The SFT → DPO run continues an adapter the way a job does: from the storage folder.
    os.environ["LORAFLEET_STORAGE_DIR"] = str(work / "storage")
    get_settings.cache_clear()
    if dialogsum_path("train") == SAMPLE_PATH:
        log("  DialogSum is not there: the bundled synthetic sample stands in")
    text = ModelText(str(model_dir))
    train_records = select(text, "train", plan.train_pairs, plan.max_prompt_tokens)
    held_records = select(text, "validation", plan.held_out, plan.max_prompt_tokens)
    answers = base_answers(model_dir, text, train_records + held_records, plan,
                           work / "cache", log)
    train_answers, held_answers = answers[:len(train_records)], answers[len(train_records):]
    pairs = write_jsonl(work / "data" / f"pairs-{plan.name}.jsonl",
                        [pair(r, a) for r, a in zip(train_records, train_answers, strict=True)])
    held = write_jsonl(work / "data" / f"held-out-{plan.name}.jsonl",
                       [pair(r, a) for r, a in zip(held_records, held_answers, strict=True)])
    sft_file = write_jsonl(work / "data" / f"sft-{plan.name}.jsonl", train_records)
    echoes = sum(a.strip()[:12] in r["dialogue"] for r, a in zip(train_records, train_answers,
                                                                  strict=True))
    outcome.data = (
        f"DialogSum: the first {len(train_records)} train and {len(held_records)} validation "
        f"dialogues whose request fits {plan.max_prompt_tokens} tokens; non-preferred = the "
        f"base model's greedy answer (at most {plan.max_new_tokens} tokens; {echoes} of the "
        f"{len(train_records)} training ones open with words of the dialogue)")

    runs = work / "runs"
    dpo_spec = job_spec(model_dir, "dpo", plan.dpo_epochs, rpo_alpha)
    dpo_adapter, outcome.train_seconds["DPO"] = train(dpo_spec, pairs, runs / "dpo", log,
                                                      "dpo" in stages)
    sft_spec = job_spec(model_dir, "supervised", plan.sft_epochs)
    sft_adapter, outcome.train_seconds["SFT"] = train(sft_spec, sft_file, runs / "sft", log,
                                                      "sft" in stages)
    sft_kept = storage.adapter_key("ftjob-bench-sft", 1)  # where a job's runner commits it
    if "sft-dpo" in stages:
        folders.commit_folder(storage.get_store(), sft_adapter, sft_kept)
    then_spec = job_spec(model_dir, "dpo", plan.dpo_epochs, rpo_alpha,
                         initial_model="ft:bench-sft", initial_adapter=sft_kept)
    then_adapter, outcome.train_seconds["SFT → DPO"] = train(
        then_spec, pairs, runs / "sft-dpo", log, "sft-dpo" in stages)
    outcome.settings = {
        "DPO": f"beta {dpo_spec.dpo.beta}, loss {dpo_spec.dpo.loss_type}"
               + (f" + RPO term × {rpo_alpha:g}" if rpo_alpha else "")
               + f", lr {dpo_spec.learning_rate:g}",
        "SFT": f"lr {sft_spec.learning_rate:g}, packed"}
    if "score" not in stages:
        return outcome

    tokenizer = load_tokenizer(str(model_dir))
    rows = method_for(dpo_spec).prepare(dpo_spec, tokenizer, *held).train
    summaries = [r["summary"] for r in held_records]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(dpo_adapter), adapter_name="DPO")
    model.load_adapter(str(sft_adapter), adapter_name="SFT")
    model.load_adapter(str(then_adapter), adapter_name="SFT → DPO")
    model.eval()
    t0 = time.perf_counter()
    with model.disable_adapter():
        base_logps = pair_logps(model, rows)
    logps = {"base": base_logps}
    outcome.scores["base"] = scores(base_logps, base_logps, held_answers, summaries)
    for name, reference in (("DPO", "base"), ("SFT", "base"), ("SFT → DPO", "SFT")):
        model.set_adapter(name)
        logps[name] = pair_logps(model, rows)
        tuned = generate(model, text, [request(r["dialogue"]) for r in held_records],
                         plan.max_new_tokens)
        outcome.scores[name] = scores(logps[name], logps[reference], tuned, summaries)
        log(f"  {name}: preference accuracy {outcome.scores[name].accuracy:.2f}, ROUGE-L "
            f"{outcome.scores[name].rouge_l:.3f}")
    log(f"  scored in {time.perf_counter() - t0:.0f} s")
    outcome.loads = (outcome.loads[0], report.load())
    return outcome


# --------------------------------------------------------------------------- the report
REFERENCES = {"base": "itself", "DPO": "base", "SFT": "base", "SFT → DPO": "SFT"}


def markdown(outcome: Outcome, where: str, seconds: float) -> str:
    plan = outcome.plan
    base, dpo, then = (outcome.scores[k] for k in ("base", "DPO", "SFT → DPO"))
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m bench.dpo` ({plan.name} size, {report.stamp()}, {seconds:,.0f} s in all): "
        "SmolLM2-135M-Instruct (`lorafleet models pull smollm2-135m`) taught by DPO jobs to "
        "prefer DialogSum's reference summaries over its own answers, each job run as the "
        "worker runs it (the method's data preparation and `train_adapter`).",
        "",
        f"- Machine: {where}; {outcome.threads} torch thread(s); 1-min load average "
        f"{outcome.loads[0]} at the start, {outcome.loads[1]} at the end (shared machine).",
        f"- Data: {outcome.data}. Requests in SmolLM2's chat template (the job's `chat` "
        f"format): one user message, \"{DEFAULT_INSTRUCTION}\", a blank line, the dialogue.",
        f"- Jobs: batch {BATCH_SIZE}, LoRA r {LORA['r']} / alpha {LORA['alpha']} on the "
        f"projections, seed {SEED}, each method's default learning rate; DPO: "
        f"{outcome.settings['DPO']}, {plan.dpo_epochs:g} epoch; SFT: {outcome.settings['SFT']}, "
        f"{plan.sft_epochs:g} epoch on the same dialogues with their reference summaries. "
        "Training seconds: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                         outcome.train_seconds.items()) + ".",
        f"- Held out: the {plan.held_out} validation pairs. *Preference accuracy*: the share "
        "whose policy log-ratio of preferred over non-preferred is above the reference's (the "
        "model's DPO reward margin is positive); a model that is its own reference scores 0. "
        "*Prefers*: the share where the model gives the preferred answer the higher "
        "log-probability. *ROUGE-L*: F1 (stemmed) of its greedy answers (at most "
        f"{plan.max_new_tokens} tokens) against the reference summaries.",
        "",
    ]
    header = ["model", "reference", "preference accuracy", "prefers", "ROUGE-L"]
    rows = [[f"**{name}**" if name in ("DPO", "SFT → DPO") else name, REFERENCES[name],
             f"{s.accuracy:.2f}" if s.accuracy is not None else "", f"{s.prefers:.2f}",
             f"{s.rouge_l:.3f}"] for name, s in outcome.scores.items()]
    lines += [report.table(header, rows), ""]
    for name, s in (("DPO", dpo), ("SFT → DPO", then)):
        assert s.accuracy is not None
        lines.append(
            f"- {name}: preference accuracy {base.accuracy:.2f} → {s.accuracy:.2f} (goal ≥ "
            f"{GOAL_ACCURACY}), ROUGE-L {s.rouge_l:.3f}, {s.rouge_l - base.rouge_l:+.3f} over "
            f"the base model's (goal ≥ +{GOAL_ROUGE_MARGIN}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size (a few minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--rpo-alpha", type=float, default=None,
                        help="the DPO jobs' rpo_alpha (default: none, plain DPO)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run (default: all); a stage left out "
                        "takes the adapter an earlier run of it left in --work")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--work", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    os.environ.setdefault("LORAFLEET_DEVICE", "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    where = report.machine()
    print(f"DPO benchmark, {plan.name}: {plan.train_pairs} pairs, {plan.held_out} held out\n"
          f"  {where}", flush=True)
    started = time.monotonic()
    stages = tuple(args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    outcome = run(plan, args.work, args.models_dir, log=lambda m: print(m, flush=True),
                  rpo_alpha=args.rpo_alpha, stages=stages)
    if "score" not in stages:
        print(f"trained {', '.join(stages)} in {time.monotonic() - started:.0f} s")
        return 0
    md = markdown(outcome, where, time.monotonic() - started)
    print(md)
    if args.write:
        report.replace_section(SECTION, md)
        print(f"wrote the '{SECTION}' section of {report.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
