"""Training throughput: the seed recipe (side A) against lorafleet's own training path (side B).

Side B is what a job runs: ``worker.preprocess.prepare`` then ``worker.training.train_adapter``
with a ``TrainingSpec`` built from ``JobCreate``'s defaults. Both sides train the same examples
in the same order for the same optimizer steps and effective batch; throughput is real
(non-padding) tokens per second of the training loop. Each side is run ``repeats`` times,
alternating, and its fastest run counts: the machine may be shared, and a slow run says more
about the neighbours than about the code. The trained adapters are then scored on the same
validation examples with the same loss (see :func:`bench.workload.validation_loss`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.recipe import CountingCollator, Hyper, RunResult, StepClock, train_recipe
from bench.workload import (
    FORMAT,
    Losses,
    ModelSize,
    build_model,
    read_records,
    select_examples,
    validation_loss,
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark mode."""

    name: str
    size: ModelSize
    hyper: Hyper
    corpus_records: int
    validation_examples: int
    repeats: int
    technique_steps: int | None  # None: skip the per-technique runs


QUICK = Plan(
    name="quick",
    size=ModelSize(hidden_size=320, num_hidden_layers=4, num_attention_heads=5,
                   intermediate_size=1280, vocab_size=8192),
    hyper=Hyper(steps=6, batch_size=8, grad_accum=1, max_length=512),
    corpus_records=4000,
    validation_examples=16,
    repeats=1,
    technique_steps=None,
)
FULL = Plan(
    name="full",
    size=ModelSize(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                   intermediate_size=1536, vocab_size=8192),
    hyper=Hyper(steps=60, batch_size=8, grad_accum=1, max_length=512),
    corpus_records=12460,
    validation_examples=100,
    repeats=2,
    technique_steps=12,
)

# The service benchmark's job: small enough to run several times, long enough that the
# service's fixed costs are measured against real training.
SERVICE_HYPER = Hyper(steps=30, batch_size=4, grad_accum=1, max_length=512)


def build_service_model(work: Path) -> tuple[Path, int]:
    """The quick mode's model, alone in a folder (the service's models folder)."""
    return build_model(work / "models" / "service-model", QUICK.size, QUICK.corpus_records)


# --------------------------------------------------------------------------- side B
def lorafleet_spec(model_dir: Path, hp: Hyper, **options: Any) -> Any:
    """The ``TrainingSpec`` a job gets from ``JobCreate``'s defaults plus ``options`` (the
    request's extension fields), converted the way ``api.jobs.build_spec`` does."""
    from shared.schemas import JobCreate, LoraSpec, TrainingSpec
    from shared.templates import PromptFormat

    req = JobCreate(
        model=str(model_dir), training_file="file-bench", prompt_format=FORMAT,
        max_length=hp.max_length, max_steps=hp.steps, batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum, learning_rate=hp.learning_rate,
        warmup=hp.warmup, save_steps=hp.steps, logging_steps=max(1, hp.steps // 4),
        seed=hp.seed, lora=LoraSpec(r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout),
        **options,
    )
    return TrainingSpec(
        model=req.model, training_file=req.training_file, lora=req.lora,
        prompt_format=PromptFormat.parse(req.prompt_format), record_shape="dialogsum",
        max_length=req.max_length, max_steps=req.max_steps, n_epochs=1.0,
        batch_size=req.batch_size or hp.batch_size,
        gradient_accumulation_steps=req.gradient_accumulation_steps,
        max_tokens_per_batch=req.max_tokens_per_batch,
        learning_rate=req.learning_rate or hp.learning_rate, warmup=req.warmup,
        save_steps=req.save_steps, logging_steps=req.logging_steps,
        train_on_inputs=req.train_on_inputs, packing=req.packing,
        gradient_checkpointing=req.gradient_checkpointing, quantization=req.quantization,
        seed=hp.seed,
    )


@contextlib.contextmanager
def _patched(module: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def train_lorafleet(model_dir: Path, train_file: Path, out_dir: Path, hp: Hyper, *,
                    label: str, knobs: dict[str, Any] | None = None,
                    device: str = "auto", **options: Any) -> RunResult:
    """Run side B: ``prepare`` + ``train_adapter`` as a job does; time the training loop.

    ``knobs`` switch off or on what a job can't (to measure one technique at a time):
    ``plain_gelu`` (transformers' unfused GELU), ``dense_packed_mask`` (transformers' own
    handling of packed rows), ``lm_head_everywhere``, ``full_last_layer`` (the last layer on
    every position), ``torch_compile``, ``dataloader_workers``.
    """
    from modelio.loading import load_tokenizer
    from shared.settings import get_settings
    from worker.preprocess import prepare
    from worker.training import Hooks, StartInfo, model, supervised, trainer

    knobs = knobs or {}
    shutil.rmtree(out_dir, ignore_errors=True)
    # A fresh storage folder: the preprocessing cache starts cold, as for a new job.
    os.environ["LORAFLEET_STORAGE_DIR"] = str(out_dir / "storage")
    get_settings.cache_clear()
    spec = lorafleet_spec(model_dir, hp, **options)
    counter: dict[str, CountingCollator] = {}

    def wrap_collator(make: Any) -> Any:
        def made(*args: Any, **kwargs: Any) -> Any:
            if knobs.get("lm_head_everywhere"):
                kwargs["loss_only_where_labeled"] = False
            counter["c"] = CountingCollator(make(*args, **kwargs))
            return counter["c"]
        return made

    def wrap_args(make: Any) -> Any:
        def made(*args: Any, **kwargs: Any) -> Any:
            targs = make(*args, **kwargs)
            if knobs.get("torch_compile"):
                targs.torch_compile = True
                targs.torch_compile_backend = "inductor"
            if knobs.get("dataloader_workers"):
                targs.dataloader_num_workers = int(knobs["dataloader_workers"])
            return targs
        return made

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(supervised, "make_collator", wrap_collator))
        stack.enter_context(_patched(supervised, "training_arguments", wrap_args))
        if knobs.get("plain_gelu"):
            stack.enter_context(_patched(model, "fuse_tanh_gelu", lambda f: lambda m: 0))
        if knobs.get("full_last_layer"):
            stack.enter_context(_patched(model, "run_last_layer_on_loss_positions",
                                         lambda f: lambda m: False))
        if knobs.get("dense_packed_mask"):
            stack.enter_context(_patched(model, "use_packed_attention",
                                         lambda f: lambda m: False))
        tokenizer = load_tokenizer(spec.model)
        digest = hashlib.sha256(train_file.read_bytes()).hexdigest()
        data = prepare(spec, tokenizer, train_file, digest)
        clock = StepClock()
        cpu: dict[str, float] = {}

        class Clock(Hooks):
            def on_start(self, info: StartInfo) -> None:
                clock.start = time.perf_counter()
                cpu["start"] = time.process_time()

            def should_stop(self) -> str | None:  # asked once per step
                clock.tick()
                return None

        result = trainer.train_adapter(spec, tokenizer, data, out_dir / "checkpoints",
                                       out_dir / "adapter", device=device, hooks=Clock())
        cpu["end"] = time.process_time()  # the adapter's save included (well under 1%)
    count = counter["c"]
    assert result.adapter_dir is not None
    if count.batches:
        real, padded, first = count.real, count.padded, sum(count.batches[:hp.grad_accum])
    else:  # collated in data-loader processes: the Trainer's own count (exact when packed)
        real = padded = result.trained_tokens
        first = real // max(result.step, 1)
    return RunResult(label, result.train_seconds, real, padded, result.step,
                     result.adapter_dir, dropped=data.dropped_too_long,
                     first_step_seconds=clock.first or 0.0, first_step_tokens=first,
                     cpu_seconds=cpu["end"] - cpu.get("start", cpu["end"]))


# --------------------------------------------------------------------------- the benchmark
@dataclass
class Row:
    run: RunResult
    settings: str
    losses: Losses | None = None
    base: str | None = None  # techniques: the variant this one adds to (None: the row above)


@dataclass
class Outcome:
    plan: Plan
    model_desc: str
    data_desc: str
    main: list[Row]
    untrained: Losses | None = None
    threads: int = 0
    techniques: list[Row] = field(default_factory=list)
    technique_hyper: Hyper | None = None

    @property
    def a(self) -> Row:
        return self.main[0]

    @property
    def b(self) -> Row:
        return self.main[1]

    @property
    def ratio(self) -> float:
        return self.b.run.tokens_per_second / self.a.run.tokens_per_second


Variant = tuple[str, str, Callable[[Path, Path, Path, Hyper], RunResult]]


def _recipe(label: str, **kw: Any) -> Callable[[Path, Path, Path, Hyper], RunResult]:
    return lambda m, t, o, hp: train_recipe(m, t, o, hp, label=label, **kw)


def _ours(label: str, **kw: Any) -> Callable[[Path, Path, Path, Hyper], RunResult]:
    return lambda m, t, o, hp: train_lorafleet(m, t, o, hp, label=label, **kw)


MAIN: list[Variant] = [
    ("A", "recipe: padded batches, labels = input_ids, plain Trainer", _recipe("A")),
    ("B", "lorafleet job defaults: packing with per-sample attention, loss on the response, "
          "LM head and last layer on labeled positions only, fused GELU", _ours("B")),
    ("B, train_on_inputs", "lorafleet, `train_on_inputs: true` (A's objective), packing",
     _ours("B, train_on_inputs", train_on_inputs=True)),
]

def _technique(label: str, settings: str, side: str, **kw: Any) -> Variant:
    train = _recipe(label, **kw) if side == "A" else _ours(label, **kw)
    return (label, settings, train)


# Cumulative: each row adds one technique to the row above it (or to its LADDER_BASE).
_PLAIN_LAYERS = {"plain_gelu": True, "full_last_layer": True}
TECHNIQUES: list[Variant] = [
    _technique("A", "recipe", "A"),
    _technique("A + group by length", "recipe, `train_sampling_strategy=group_by_length`",
               "A", group_by_length=True),
    _technique("seed layout via lorafleet", "`packing: false, train_on_inputs: true`; no KV "
               "cache, unfused GELU", "B", packing=False, train_on_inputs=True,
               knobs=_PLAIN_LAYERS),
    _technique("+ packing, transformers' packed mask", "`train_on_inputs: true`; one dense "
               "mask over the whole row", "B", train_on_inputs=True,
               knobs={**_PLAIN_LAYERS, "dense_packed_mask": True}),
    _technique("+ packing, per-sample attention", "`train_on_inputs: true`", "B",
               train_on_inputs=True, knobs=_PLAIN_LAYERS),
    _technique("+ loss on the response only", "LM head on every position", "B",
               knobs={**_PLAIN_LAYERS, "lm_head_everywhere": True}),
    _technique("+ LM head on labeled positions only", "", "B", knobs=_PLAIN_LAYERS),
    _technique("+ fused tanh GELU", "", "B", knobs={"full_last_layer": True}),
    _technique("+ last layer on labeled positions only", "job defaults (= B)", "B"),
    _technique("+ 2 dataloader workers", "B + `dataloader_num_workers=2`", "B",
               knobs={"dataloader_workers": 2}),
]
# Variants that branch off an earlier row instead of adding to the one above them.
LADDER_BASE = {"A + group by length": "A", "seed layout via lorafleet": "A",
               "+ packing, per-sample attention": "seed layout via lorafleet",
               "+ 2 dataloader workers": "+ last layer on labeled positions only",
               "+ torch.compile": "+ last layer on labeled positions only"}
# Compiling takes minutes on a small CPU (more with every new packed length): opt-in.
COMPILE: Variant = _technique("+ torch.compile", "B + `torch_compile=True` (inductor)", "B",
                              knobs={"torch_compile": True})


def _best(runs: list[RunResult]) -> RunResult:
    return max(runs, key=lambda r: r.tokens_per_second)


def run(plan: Plan, work: Path, log: Callable[[str], None] = print,
        techniques: bool = True, compile_: bool = False) -> Outcome:
    """Run one mode of the training-throughput benchmark under ``work``."""
    from transformers import AutoTokenizer

    hp = plan.hyper
    model_dir, params = build_model(work / f"model-{plan.name}", plan.size, plan.corpus_records)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_file, skipped = select_examples(tokenizer, "train", hp.examples, hp.max_length,
                                          work / "data" / f"train-{plan.name}.jsonl")
    valid_file, _ = select_examples(tokenizer, "validation", plan.validation_examples,
                                    hp.max_length, work / "data" / f"valid-{plan.name}.jsonl")
    model_desc = plan.size.describe(params)
    data_desc = (
        f"DialogSum train ({train_file.name}: the first {hp.examples} records that fit "
        f"max_length {hp.max_length} on both sides; {skipped} longer ones passed over), "
        f"`dolly` format; {hp.steps} optimizer steps × batch {hp.batch_size} × accumulation "
        f"{hp.grad_accum} (one epoch), seed {hp.seed}, lr {hp.learning_rate:g}, warm-up "
        f"{hp.warmup} steps, LoRA r {hp.lora_r} / alpha {hp.lora_alpha:g} / dropout "
        f"{hp.lora_dropout:g} on q, k, v, dense, fc1, fc2; fp32 on CPU"
    )
    runs: dict[str, list[RunResult]] = {label: [] for label, _, _ in MAIN}
    for rep in range(plan.repeats):
        for label, _, train in MAIN:
            out = work / "runs" / f"{plan.name}-{label.replace(' ', '_').replace(',', '')}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            result = train(model_dir, train_file, out, hp)
            runs[label].append(result)
            log(f"  {label:<22} run {rep + 1}/{plan.repeats}: {result.tokens_per_second:8.1f} "
                f"real tok/s ({result.real_tokens} tokens in {result.train_seconds:.1f} s)")
    valid_records = read_records(valid_file)
    main = []
    for label, settings, _ in MAIN:
        best = _best(runs[label])
        # Every repeat trains the same weights (same seed, data, order): score one of them.
        losses = validation_loss(model_dir, runs[label][0].adapter_dir, tokenizer, valid_records)
        main.append(Row(best, settings, losses))
        log(f"  {label:<22} validation loss: response {losses.response:.4f}, "
            f"all tokens {losses.all_tokens:.4f}")
    import torch

    untrained = validation_loss(model_dir, None, tokenizer, valid_records)
    outcome = Outcome(plan, model_desc, data_desc, main, untrained, torch.get_num_threads())
    if techniques and plan.technique_steps:
        thp = Hyper(**{**hp.__dict__, "steps": plan.technique_steps})
        outcome.technique_hyper = thp
        tfile, _ = select_examples(tokenizer, "train", thp.examples, thp.max_length,
                                   work / "data" / f"train-{plan.name}-techniques.jsonl")
        ladder = TECHNIQUES + ([COMPILE] if compile_ else [])
        tried: dict[str, list[RunResult]] = {label: [] for label, _, _ in ladder}
        # Round-robin, like the main comparison: a busy minute on the machine hits one run of
        # several variants, not every run of one. Compiling runs once (it takes minutes).
        for rep in range(plan.repeats):
            for label, _, train in ladder:
                if rep and label == COMPILE[0]:
                    continue
                out = work / "runs" / f"technique-{label.replace(' ', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    result = train(model_dir, tfile, out, thp)
                except Exception as e:  # noqa: BLE001 - a technique that fails is reported
                    log(f"  {label}: failed: {type(e).__name__}: {e}")
                    continue
                tried[label].append(result)
                log(f"  {label:<40} {result.tokens_per_second:8.1f} real tok/s")
        for label, settings, _ in ladder:
            if tried[label]:
                outcome.techniques.append(Row(_best(tried[label]), settings,
                                              base=LADDER_BASE.get(label)))
    return outcome


def check_same_work(outcome: Outcome) -> None:
    """Both sides must have trained the same examples: same steps, same number of examples'
    tokens up to the one eos per example that lorafleet appends."""
    a, b = outcome.a.run, outcome.b.run
    if a.steps != b.steps:
        raise SystemExit(f"steps differ: A {a.steps}, B {b.steps}")
    examples = outcome.plan.hyper.examples
    if not 0 <= b.real_tokens - a.real_tokens <= 2 * examples:
        raise SystemExit(f"the sides trained different data: A {a.real_tokens} real tokens, "
                         f"B {b.real_tokens}")


__all__ = ["FULL", "QUICK", "Outcome", "Plan", "check_same_work", "run"]
