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

``--rpo-alpha A`` gives the DPO jobs TRL's RPO term (the preferred answers' negative
log-likelihood, weight A, added to the DPO loss). The ``score`` stage scores the runs whose
adapters are there (trained now or left in ``--work`` by an earlier run), so
``--rpo-alpha 1 --stages dpo,score`` measures DPO with the RPO term alone; a run other than the
full plain one is written as its own subsection of the section (:data:`RPO_TITLE`), which leaves
the plain run's figures as they are.

The data is read from the DialogSum folder (``$LORAFLEET_DIALOGSUM_DIR``, default
``../shared/data/dialogsum``), never copied into the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.dpo_report import (
    BATCH_SIZE,
    FULL,
    LORA,
    QUICK,
    REFERENCES,
    RPO_TITLE,
    SECTION,
    SEED,
    Outcome,
    Plan,
    Scores,
    is_variant,
    label,
    markdown,
    write_variant,
)
from shared.records import DEFAULT_INSTRUCTION
from shared.samples import SAMPLE_PATH, dialogsum_path

OUT = Path(__file__).resolve().parent / "out" / "dpo"
MODELS = Path.home() / ".cache" / "lorafleet" / "models"
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
    ``run_it`` false: the adapter an earlier run of this stage left in ``out`` (the folder may
    not exist: the stage was never run there)."""
    from modelio.loading import load_tokenizer
    from worker.training import method_for, train_adapter

    rpo_alpha = spec.dpo.rpo_alpha if spec.dpo else None
    if not run_it:
        done = out / "seconds.json"
        meta = json.loads(done.read_text()) if done.is_file() else {}
        if meta.get("rpo_alpha", rpo_alpha) != rpo_alpha:
            # Its scores would go out under the wrong name.
            raise SystemExit(f"{out} was trained with rpo_alpha {meta['rpo_alpha']}, not "
                             f"{rpo_alpha}: pass that --rpo-alpha, or another --work")
        if (out / "adapter").is_dir():
            log(f"  {out.name}: the adapter of an earlier run ({out / 'adapter'})")
        return out / "adapter", float(meta.get("train_seconds", math.nan))
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
    (out / "seconds.json").write_text(json.dumps({"train_seconds": result.train_seconds,
                                                  "rpo_alpha": rpo_alpha}))
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

    outcome = Outcome(plan, threads=torch.get_num_threads(), rpo_alpha=rpo_alpha)
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
    adapters: dict[str, Path] = {}  # the runs there are to score, by name

    def keep(name: str, trained: tuple[Path, float]) -> None:
        if trained[0].is_dir():
            adapters[name], outcome.train_seconds[name] = trained

    dpo_spec = job_spec(model_dir, "dpo", plan.dpo_epochs, rpo_alpha)
    keep("DPO", train(dpo_spec, pairs, runs / "dpo", log, "dpo" in stages))
    sft_spec = job_spec(model_dir, "supervised", plan.sft_epochs)
    keep("SFT", train(sft_spec, sft_file, runs / "sft", log, "sft" in stages))
    sft_kept = storage.adapter_key("ftjob-bench-sft", 1)  # where a job's runner commits it
    if "sft-dpo" in stages:
        if "SFT" not in adapters:
            raise SystemExit(f"the sft-dpo stage continues the SFT adapter, and {runs / 'sft'} "
                             "has none: add the sft stage to --stages")
        folders.commit_folder(storage.get_store(), adapters["SFT"], sft_kept)
    then_spec = job_spec(model_dir, "dpo", plan.dpo_epochs, rpo_alpha,
                         initial_model="ft:bench-sft", initial_adapter=sft_kept)
    keep("SFT → DPO", train(then_spec, pairs, runs / "sft-dpo", log, "sft-dpo" in stages))
    outcome.settings = {
        "DPO": f"beta {dpo_spec.dpo.beta}, loss {dpo_spec.dpo.loss_type}"
               + (f" + RPO term × {rpo_alpha:g}" if rpo_alpha else "")
               + f", lr {dpo_spec.learning_rate:g}",
        "SFT": f"lr {sft_spec.learning_rate:g}, packed"}
    if "score" not in stages:
        return outcome
    if not adapters:
        raise SystemExit(f"nothing to score: no adapter in {runs}; add a training stage to "
                         "--stages")
    if "SFT → DPO" in adapters and "SFT" not in adapters:
        raise SystemExit(f"SFT → DPO is scored against its reference, the SFT adapter, and "
                         f"{runs / 'sft'} has none: add the sft stage to --stages")

    tokenizer = load_tokenizer(str(model_dir))
    rows = method_for(dpo_spec).prepare(dpo_spec, tokenizer, *held).train
    summaries = [r["summary"] for r in held_records]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    first, *others = adapters
    model = PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first)
    for name in others:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    t0 = time.perf_counter()
    with model.disable_adapter():
        base_logps = pair_logps(model, rows)
    logps = {"base": base_logps}
    outcome.scores["base"] = scores(base_logps, base_logps, held_answers, summaries)
    for name in adapters:  # in REFERENCES' order: SFT's log-probabilities before SFT → DPO's
        model.set_adapter(name)
        logps[name] = pair_logps(model, rows)
        tuned = generate(model, text, [request(r["dialogue"]) for r in held_records],
                         plan.max_new_tokens)
        outcome.scores[name] = scores(logps[name], logps[REFERENCES[name]], tuned, summaries)
        log(f"  {label(name, rpo_alpha)}: preference accuracy "
            f"{outcome.scores[name].accuracy:.2f}, ROUGE-L {outcome.scores[name].rouge_l:.3f}")
    log(f"  scored in {time.perf_counter() - t0:.0f} s")
    outcome.loads = (outcome.loads[0], report.load())
    return outcome


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
    begun = report.stamp()
    stages = tuple(args.stages.split(","))
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    outcome = run(plan, args.work, args.models_dir, log=lambda m: print(m, flush=True),
                  rpo_alpha=args.rpo_alpha, stages=stages)
    if "score" not in stages:
        print(f"trained {', '.join(stages)} in {time.monotonic() - started:.0f} s")
        return 0
    niceness = os.nice(0)
    outcome.command = ((f"nice -n {niceness} " if niceness else "") + "python -m bench.dpo "
                       + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    outcome.started = begun
    md = markdown(outcome, where, time.monotonic() - started)
    print(md)
    if not args.write:
        return 0
    if not is_variant(outcome):
        report.replace_section(SECTION, md)
        print(f"wrote the '{SECTION}' section of {report.BENCHMARKS}")
    elif outcome.rpo_alpha:
        write_variant(md)
        print(f"wrote '{RPO_TITLE}' in the '{SECTION}' section of {report.BENCHMARKS}")
    else:
        # The section holds the full plain run: part of it would take the others' rows away.
        print("not written: a plain run writes the section only with all its runs scored "
              "(train the missing stages, or score a --work that has their adapters)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
