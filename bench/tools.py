"""Tool calling learned from OpenAI-format function-calling chats: SmolLM2-135M before and after
fine-tuning.

``python -m bench.tools`` (``--quick``: a CI-sized run of a few minutes, which proves the
pipeline, not the quality). ``scripts/generate_tool_chats.py`` writes the chats (seeded): one
request each, answered by one call of ``get_weather``, ``book_table``, ``convert_units`` or
``reject_request``, the tools at the top level, as OpenAI's cookbook's function-calling file.
SmolLM2-135M-Instruct (``lorafleet models pull smollm2-135m``) is fine-tuned on the first
``--train`` chats through the path a job takes (``worker.preprocess.prepare`` and
``worker.training.train_adapter``, the chat format, the tool format its probe picks), then
the base model and the fine-tuned model answer the last ``--test`` chats' requests greedily.
The score is the share of answers whose first call has the expected name and arguments
(parsed JSON, equal as values).

Scoring (``--scoring``): ``api`` (the default) asks the service as a client does: ``lorafleet
api`` and ``lorafleet serve`` on vLLM, the adapter a succeeded job's fine-tuned model, each
request sent to ``/v1/chat/completions`` with its ``tools`` (``tool_choice`` auto) and the
calls read from ``message.tool_calls``. The base model's template renders no tools (the
engine refuses them by name), so the base model gets the same prompt, rendered in the Hermes
format the adapter learned, through ``/v1/completions``, its answer read back with
:func:`shared.hermes.parse_tool_calls`. ``peft`` answers in this process instead (the base
model and the adapter loaded with ``PeftModel.from_pretrained``, each request rendered with
``ModelText.render_chat`` in the adapter's ``tool_format``), for a machine without vLLM.
``--write`` puts the section into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "generate_tool_chats.py"
OUT = REPO / "bench" / "out" / "tools"
MODELS = Path.home() / ".cache" / "lorafleet" / "models"
SECTION = "Tool calling"
GOAL = 0.8


@dataclass(frozen=True)
class Plan:
    """The size of one run."""

    name: str
    chats: int
    train: int
    test: int
    epochs: float
    batch_size: int
    grad_accum: int
    learning_rate: float
    lora_r: int
    lora_alpha: float
    max_new_tokens: int = 64
    seed: int = 0


# Batches of 4 chats as two steps of 2: a step's activations (fp32, ~500 tokens a chat) then
# stay near 3 GB, which a shared machine can spare.
FULL = Plan("full", chats=300, train=250, test=50, epochs=1, batch_size=2, grad_accum=2,
            learning_rate=1e-3, lora_r=16, lora_alpha=32)
QUICK = Plan("quick", chats=24, train=16, test=8, epochs=0.25, batch_size=2, grad_accum=2,
             learning_rate=1e-3, lora_r=8, lora_alpha=16, max_new_tokens=32)


@dataclass
class Scores:
    """How one model answered the test requests."""

    exact: float  # name and arguments as expected
    name: float  # the expected function called, whatever the arguments
    parsed: float  # a call could be read at all
    per_tool: dict[str, float] = field(default_factory=dict)  # exact, by expected function
    sample: str = ""  # the first answer, as generated


@dataclass
class Outcome:
    plan: Plan
    tool_format: str
    examples: int
    train_seconds: float
    steps: int
    trained_tokens: int
    loads: tuple[str, str]
    threads: int
    scores: dict[str, Scores] = field(default_factory=dict)
    scoring: str = "api"  # through the service, or "peft" in the benchmark's process


# --------------------------------------------------------------------------- data
def write_chats(path: Path, plan: Plan) -> list[dict[str, Any]]:
    """Run the generator script; the chats it wrote."""
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(path), "--count",
                    str(plan.chats), "--seed", str(plan.seed)], check=True)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_call(record: dict[str, Any]) -> tuple[str, Any]:
    call = record["messages"][-1]["tool_calls"][0]["function"]
    return call["name"], json.loads(call["arguments"])


def judge(answers: list[str], records: list[dict[str, Any]]) -> Scores:
    """Exact match of the first call's name and parsed arguments, the calls read from
    generated text in the Hermes format."""
    from shared.hermes import parse_tool_calls

    return judge_calls([parse_tool_calls(text).tool_calls for text in answers], records,
                       answers[0] if answers else "")


def judge_calls(calls: list[list[dict[str, Any]]], records: list[dict[str, Any]],
                sample: str = "") -> Scores:
    """Exact match of the first call (OpenAI's shape: ``{"function": {"name", "arguments"}}``,
    the arguments a JSON string) of each answer."""
    exact = name = parsed = 0
    by_tool: dict[str, list[bool]] = {}
    for answer, record in zip(calls, records, strict=True):
        want_name, want_args = expected_call(record)
        got = answer[0]["function"] if answer else None
        hit_name = got is not None and got["name"] == want_name
        hit = hit_name and json.loads(got["arguments"]) == want_args  # type: ignore[index]
        parsed += got is not None
        name += hit_name
        exact += hit
        by_tool.setdefault(want_name, []).append(hit)
    n = len(records)
    return Scores(exact / n, name / n, parsed / n,
                  {k: sum(v) / len(v) for k, v in sorted(by_tool.items())}, sample)


# --------------------------------------------------------------------------- train and score
def train(model_dir: Path, train_file: Path, work: Path, plan: Plan) -> tuple[Path, Any, float]:
    """Fine-tune as a job does: ``prepare`` then ``train_adapter``, the chat format."""
    import hashlib

    from modelio.loading import load_tokenizer
    from shared.schemas import LoraSpec, TrainingSpec
    from shared.settings import get_settings
    from shared.templates import PromptFormat
    from worker.preprocess import prepare
    from worker.training import train_adapter

    os.environ["LORAFLEET_STORAGE_DIR"] = str(work / "storage")
    get_settings.cache_clear()
    spec = TrainingSpec(
        model=str(model_dir), training_file="file-bench", lora=LoraSpec(
            r=plan.lora_r, alpha=plan.lora_alpha), prompt_format=PromptFormat(type="chat"),
        record_shape="chat", max_length=1024, n_epochs=plan.epochs,
        batch_size=plan.batch_size, gradient_accumulation_steps=plan.grad_accum,
        learning_rate=plan.learning_rate, warmup=0.05, save_steps=10_000, logging_steps=10,
        train_on_inputs=False, packing=True, seed=plan.seed)
    tokenizer = load_tokenizer(spec.model)
    data = prepare(spec, tokenizer, train_file,
                   hashlib.sha256(train_file.read_bytes()).hexdigest())
    t0 = time.perf_counter()
    result = train_adapter(spec, tokenizer, data, work / "checkpoints", work / "adapter",
                           device="cpu")
    assert result.adapter_dir is not None
    return result.adapter_dir, result, time.perf_counter() - t0


def answer_all(model: Any, text: Any, records: list[dict[str, Any]], tool_format: str,
               max_new_tokens: int) -> list[str]:
    """Greedy answers to each record's request, rendered as inference renders it."""
    from shared.chat import check_chat
    from worker.evaluation import EvalExample, generate_answers

    examples = []
    for record in records:
        chat = check_chat(record)
        prompt = text.render_chat(chat.messages[:-1], True, chat.tools, tool_format=tool_format)
        examples.append(EvalExample(text.encode(prompt), ""))
    stop_ids = sorted(text.eos_ids | text.chat_end_ids())
    return generate_answers(model, text.tokenizer, examples, max_new_tokens=max_new_tokens,
                            stop_ids=stop_ids, stops=[])


def score(model_dir: Path, adapter: Path, records: list[dict[str, Any]], plan: Plan,
          log: Any) -> tuple[dict[str, Scores], str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modelio.model_text import ModelText

    tool_format = json.loads((adapter / "lorafleet.json").read_text())["tool_format"]
    text = ModelText(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    scores: dict[str, Scores] = {}
    for name in ("base", "fine-tuned"):
        t0 = time.perf_counter()
        if name == "base":
            with model.disable_adapter():
                answers = answer_all(model, text, records, tool_format, plan.max_new_tokens)
        else:
            answers = answer_all(model, text, records, tool_format, plan.max_new_tokens)
        scores[name] = judge(answers, records)
        log(f"  {name}: exact {scores[name].exact:.3f}, name {scores[name].name:.3f}, "
            f"parsed {scores[name].parsed:.3f} ({time.perf_counter() - t0:.0f} s)")
    return scores, tool_format


def score_api(model_dir: Path, adapter: Path, records: list[dict[str, Any]], plan: Plan,
              work: Path, log: Any) -> tuple[dict[str, Scores], str]:
    """Both models asked through the service (``lorafleet api`` and ``lorafleet serve`` on
    vLLM) by the openai SDK, requests sent concurrently as clients would."""
    import openai

    from bench.serving_latency import LiveService
    from modelio.model_text import ModelText
    from shared.chat import check_chat
    from shared.hermes import parse_tool_calls

    tool_format = json.loads((adapter / "lorafleet.json").read_text())["tool_format"]
    text = ModelText(str(model_dir))
    chats = [check_chat(r) for r in records]
    with LiveService(work / "service", model_dir, [adapter], threads=1, max_batch=32,
                     prompt_format={"type": "chat"}) as service:
        service.start_engine({"LORAFLEET_ENGINE_BACKEND": "vllm"})
        client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.key,
                               timeout=900, max_retries=0)
        fine_tuned = service.names[0]

        def ask_fine_tuned(i: int) -> tuple[list[dict[str, Any]], str]:
            record = records[i]
            reply = client.chat.completions.create(
                model=fine_tuned, messages=record["messages"][:-1], tools=record["tools"],
                temperature=0, max_tokens=plan.max_new_tokens)
            message = reply.choices[0].message
            calls = [c.model_dump() for c in message.tool_calls or []]
            return calls, json.dumps(calls) if calls else message.content or ""

        def ask_base(i: int) -> tuple[list[dict[str, Any]], str]:
            chat = chats[i]
            prompt = text.render_chat(chat.messages[:-1], True, chat.tools,
                                      tool_format=tool_format)
            reply = client.completions.create(model=service.base, prompt=prompt, temperature=0,
                                              max_tokens=plan.max_new_tokens,
                                              stop=[text.tokenizer.eos_token])
            answer = reply.choices[0].text
            return parse_tool_calls(answer).tool_calls, answer

        scores: dict[str, Scores] = {}
        for name, ask in (("base", ask_base), ("fine-tuned", ask_fine_tuned)):
            ask(0)  # starts vLLM, loads the adapter
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(len(records))))
            scores[name] = judge_calls([a[0] for a in answers], records, answers[0][1])
            log(f"  {name}: exact {scores[name].exact:.3f}, name {scores[name].name:.3f}, "
                f"parsed {scores[name].parsed:.3f} ({time.perf_counter() - t0:.0f} s)")
    return scores, tool_format


def run(plan: Plan, work: Path, models_dir: Path, log: Any = print,
        scoring: str = "api") -> Outcome:
    import torch

    from cli.models import pull_model

    model_dir = pull_model("smollm2-135m", models_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    records = write_chats(work / "chats.jsonl", plan)
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records[:plan.train]))
    test = records[-plan.test:]
    loads = report.load()
    log(f"  training on {plan.train} chats, {plan.epochs:g} epoch(s)")
    adapter, result, seconds = train(model_dir, train_file, work, plan)
    log(f"  trained {result.step} steps, {result.trained_tokens} tokens in {seconds:.0f} s")
    if scoring == "api":
        scores, tool_format = score_api(model_dir, adapter, test, plan, work, log)
    else:
        scores, tool_format = score(model_dir, adapter, test, plan, log)
    return Outcome(plan, tool_format, plan.train, seconds, result.step, result.trained_tokens,
                   (loads, report.load()), torch.get_num_threads(), scores, scoring)


# --------------------------------------------------------------------------- the report
def markdown(outcome: Outcome, where: str, command: str, seconds: float | None = None) -> str:
    plan = outcome.plan
    fine = outcome.scores["fine-tuned"]
    lines = [
        f"## {SECTION}",
        "",
        f"`{command}` ({plan.name} size, {report.stamp()}"
        + (f", {seconds:,.0f} s in all" if seconds is not None else "")
        + "): SmolLM2-135M-Instruct "
        "(`lorafleet models pull smollm2-135m`) fine-tuned on OpenAI-format function-calling "
        "chats, then asked the held-out requests, base model vs fine-tuned.",
        "",
        f"- Machine: {where}; {outcome.threads} torch thread(s); 1-min load average "
        f"{outcome.loads[0]} at the start, {outcome.loads[1]} at the end (shared machine).",
        f"- Data: `scripts/generate_tool_chats.py --count {plan.chats} --seed {plan.seed}`: "
        "one request per chat answered by one call of `get_weather`, `book_table`, "
        "`convert_units` or `reject_request` (tools at the top level, an assistant message "
        f"with `tool_calls` and no `content`); the first {plan.train} train, the last "
        f"{plan.test} are the test.",
        f"- Training: the path a job takes (`prepare` + `train_adapter`), prompt format `chat`, "
        f"tool format `{outcome.tool_format}` (the probe's choice for SmolLM2's template, "
        f"stored in the adapter's `lorafleet.json`); {plan.epochs:g} epoch(s), batches of "
        f"{plan.batch_size} × {plan.grad_accum} accumulated, lr {plan.learning_rate:g}, LoRA r "
        f"{plan.lora_r} / alpha "
        f"{plan.lora_alpha:g}, fp32 on CPU: {outcome.steps} steps, "
        f"{outcome.trained_tokens:,} tokens in {outcome.train_seconds:.0f} s.",
        ("- Scoring: through the service (`lorafleet api`, `lorafleet serve` on vLLM), as a "
         "client asks, 8 requests at a time, greedy, at most "
         f"{plan.max_new_tokens} new tokens. The fine-tuned model: `/v1/chat/completions` with "
         "the chat's `tools` (`tool_choice` auto), the engine rendering them in the tool format "
         f"the adapter stored (`{outcome.tool_format}`), the calls read from "
         "`message.tool_calls`. The base model, whose template renders no tools (the engine "
         "refuses them for it, naming `tools`): the same prompt text through "
         "`/v1/completions`, read back with `shared.hermes.parse_tool_calls`."
         if outcome.scoring == "api" else
         "- Scoring: with peft in the benchmark's process (`--scoring peft`: the base model and "
         "the adapter loaded with `PeftModel.from_pretrained`). Each request is rendered with "
         "the chat's tools as inference renders it (`ModelText.render_chat`, tool format "
         f"`{outcome.tool_format}`), answered greedily (at most {plan.max_new_tokens} new "
         "tokens), and read back with `shared.hermes.parse_tool_calls`.")
        + " *Exact*: the first call's name and arguments (parsed JSON) equal the expected "
        "ones; *name*: the right function; *parsed*: a call at all.",
        "",
    ]
    tools = sorted(fine.per_tool)
    header = ["model", "exact", "name", "parsed", *[f"exact `{t}`" for t in tools]]
    rows = [[name, f"{s.exact:.2f}", f"{s.name:.2f}", f"{s.parsed:.2f}",
             *[f"{s.per_tool.get(t, 0):.2f}" for t in tools]]
            for name, s in outcome.scores.items()]
    lines += [report.table(header, rows), ""]
    verdict = "met" if fine.exact >= GOAL else "not met"
    lines.append(f"- Fine-tuned exact match {fine.exact:.2f} vs base "
                 f"{outcome.scores['base'].exact:.2f} (goal ≥ {GOAL}: {verdict}).")
    lines.append(f"- A fine-tuned answer: `{fine.sample.strip()!r}`; the base model's: "
                 f"`{outcome.scores['base'].sample.strip()[:160]!r}`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: a few minutes")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads wait "
                        "for each other; 0: torch's default)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--work", type=Path, default=OUT)
    parser.add_argument("--scoring", choices=("api", "peft"), default="api",
                        help="ask the service on vLLM (default) or peft in this process")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.epochs:
        plan = Plan(**{**plan.__dict__, "name": "custom", "epochs": args.epochs})
    where = report.machine()
    print(f"tool-calling benchmark, {plan.name}: {plan.train} train / {plan.test} test chats\n"
          f"  {where}", flush=True)
    started = time.monotonic()
    outcome = run(plan, args.work / plan.name, args.models_dir,
                  log=lambda m: print(m, flush=True), scoring=args.scoring)
    niceness = os.nice(0)
    command = (f"nice -n {niceness} " if niceness else "") + "python -m bench.tools" + (
        " --quick" if args.quick else "") + (
        f" --epochs {args.epochs:g}" if args.epochs else "") + (
        " --scoring peft" if args.scoring == "peft" else "") + (" --write" if args.write else "")
    took = time.monotonic() - started
    md = markdown(outcome, where, command, took)
    print(md)
    print(f"took {took:.0f} s")
    if args.write:
        report.replace_section(SECTION, md)
        print(f"wrote the '{SECTION}' section of {report.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
