"""GPU check: LoRA through lorafleet's training path and through the seed recipe, per case.

Cases (random init, nothing downloaded: the tokenizer is trained here on the bundled sample):

  phi2         Phi-2's configuration (2.7 B), bf16 LoRA: lorafleet (B) and the recipe (A)
  phi2-qlora   the same model with ``quantization: "4bit"`` (QLoRA): B alone (the recipe has
               no QLoRA; B/A is against the recipe's bf16 run of the model)
  llama8b      a Llama-3-8B-shaped configuration, bf16 LoRA: B and A (a non-Phi architecture)
  llama8b-qlora  the same with QLoRA (not run unless named: peak memory of an 8 B QLoRA job)

Side B is what a job runs (``prepare`` + ``train_adapter`` with ``JobCreate``'s defaults, bf16
on a GPU that has it); side A is the seed recipe. Each side trains the same examples for the
same steps; reported: real (non-padding) tokens/s, executed FLOPs per real token and the MFU
from them, peak GPU memory, and B/A.

Executed FLOPs count what the GPU computed, from each batch's actual layout: 2 per multiply-add
of every matmul the forward ran, the same again for the backward's activation gradients (the
frozen base has no weight gradients; the first layer's projections of the embeddings need no
input gradient either), and attention over the query-key pairs the kernels computed (causal
within each sample for B's packed rows, the whole padded square for A's masked batches;
backward twice the forward). B skips the LM head on positions without a target and, on Phi,
the last layer's queries, attention and MLP there: not executed, so not counted. Not counted
on either side: LoRA's own matmuls (about 1 %), recomputation under gradient checkpointing,
elementwise ops. MFU is against the GPU's dense bf16 peak.

``--dry-run`` runs the same code on the CPU with tiny models (QLoRA cases are skipped: they
need CUDA), to check the script anywhere. Results also go to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PHI2 = {  # microsoft/phi-2 config.json, as transformers 5 reads it
    "model_type": "phi",
    "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
    "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "resid_pdrop": 0.1,
    "embd_pdrop": 0.0, "attention_dropout": 0.0, "qk_layernorm": False,
    "tie_word_embeddings": False,
}
LLAMA8B = {  # meta-llama/Meta-Llama-3-8B's shape: grouped-query attention, gated MLP
    "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False,
}
TINY = {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4}
MODELS = {"phi2": PHI2, "llama8b": LLAMA8B}
TINY_MODELS = {"phi2": {**PHI2, **TINY, "num_key_value_heads": 4},
               "llama8b": {**LLAMA8B, **TINY, "num_key_value_heads": 2}}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of MODELS
    quantization: str | None = None
    recipe: bool = True  # also run side A (bf16 LoRA; there is no QLoRA recipe)


CASES = {c.name: c for c in [
    Case("phi2", "phi2"),
    Case("phi2-qlora", "phi2", quantization="4bit", recipe=False),
    Case("llama8b", "llama8b"),
    Case("llama8b-qlora", "llama8b", quantization="4bit", recipe=False),
]}
DEFAULT_CASES = "phi2,phi2-qlora,llama8b"

# Dense bf16 peak TFLOP/s by device-name fragment (first match wins); --peak-tflops overrides.
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0)]


def peak_tflops(name: str) -> float | None:
    for fragment, value in PEAKS:
        if fragment in name:
            return value
    return None


def build(dest: Path, config: dict[str, Any], device: str, dtype: Any) -> tuple[Path, int]:
    """Random-init model of ``config`` (with its ``model_type``) and an offline tokenizer,
    saved to ``dest`` (reused when the config matches). Returns the folder and the parameter
    count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.tiny_model import build_tokenizer

    stamp = dest / "gpu-check.json"
    wanted = {"config": config, "dtype": str(dtype)}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        dest.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(vocab_size=min(8192, config["vocab_size"]))
        fields = {k: v for k, v in config.items() if k != "model_type"}
        cfg = AutoConfig.for_model(config["model_type"], **fields,
                                   pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        # Initialised on the device, in the training dtype: no float32 copy on the host.
        with torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        stamp.write_text(json.dumps(wanted))
        del model
    from safetensors import safe_open

    params = 0
    for shard in dest.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                params += n
    return dest, params


# --------------------------------------------------------------------------- executed FLOPs
@dataclass
class Work:
    """What one batch made the model compute."""

    rows: int  # positions through the decoder layers, padding included
    real: int  # real tokens
    pairs: int  # query-key pairs attention computed, per layer
    head_rows: int  # positions through the LM head
    last_rows: int | None = None  # positions through the last layer's queries and MLP (None: all)
    last_pairs: int = 0


def packed_work(batch: dict[str, Any]) -> Work:
    """A packed row (lorafleet's collator): per-sample causal attention."""
    from worker.attention import SAMPLE_BOUNDS
    from worker.last_layer import LOSS_ROWS, LOSS_SPANS, MAX_SHARE

    cuts = batch[SAMPLE_BOUNDS].cuts
    rows = cuts[-1]
    pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cuts, cuts[1:], strict=False))
    head = batch["shift_labels"].numel() if "shift_labels" in batch else rows
    work = Work(rows, rows, pairs, head)
    labeled = batch[LOSS_ROWS].numel() if LOSS_ROWS in batch else 0
    if LOSS_SPANS in batch and 0 < labeled <= MAX_SHARE * rows:  # the layer's own test
        work.last_rows = labeled
        work.last_pairs = sum((s.end - s.first) * (s.key_end - s.key_start)
                              for s in batch[LOSS_SPANS].spans)
    return work


def padded_work(batch: dict[str, Any]) -> Work:
    """A padded batch: every position runs, attention over the masked square."""
    n, length = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None else n * length
    head = batch["shift_labels"].numel() if "shift_labels" in batch else n * length
    return Work(n * length, real, n * length * length, head)


def work_of(batch: dict[str, Any]) -> Work:
    from worker.attention import SAMPLE_BOUNDS

    return packed_work(batch) if SAMPLE_BOUNDS in batch else padded_work(batch)


def executed_flops(config: dict[str, Any], work: Work) -> float:
    """Forward + backward FLOPs of one batch (see the module docstring for what counts)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    kv = 2 * hidden * config.get("num_key_value_heads", heads) * head_dim
    q = o = hidden * heads * head_dim
    gated = config["model_type"] != "phi"  # Llama-style gate/up/down; Phi: fc1/fc2
    mlp = (3 if gated else 2) * hidden * config["intermediate_size"]
    attention = 12 * heads * head_dim  # per pair: QK and AV, 2 FLOPs a multiply-add, ×3
    layer = 4 * (q + kv + o + mlp) * work.rows + attention * work.pairs
    if work.last_rows is None:
        last = layer
    else:
        last = (4 * kv * work.rows + 4 * (q + o + mlp) * work.last_rows
                + attention * work.last_pairs)
    # Layer 0's projections of the (frozen) embeddings: no input gradient.
    reads_embeddings = q + kv + (0 if gated else hidden * config["intermediate_size"])
    head = 4 * config["vocab_size"] * hidden * work.head_rows
    return layer * (layers - 1) + last - 2 * reads_embeddings * work.rows + head


class WorkLog:
    """The work of the batches one side trained on (the data loader may collate ahead)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.batches: list[Work] = []

    def add(self, batch: dict[str, Any]) -> None:
        if len(self.batches) < self.limit:
            self.batches.append(work_of(batch))

    def flops_per_real_token(self, config: dict[str, Any]) -> float:
        real = sum(w.real for w in self.batches)
        return sum(executed_flops(config, w) for w in self.batches) / real if real else 0.0


@contextmanager
def logging_work(log: WorkLog) -> Iterator[None]:
    """Log the batches of either side: lorafleet's collator, and the recipe's counter."""
    from bench import recipe
    from worker.training import supervised

    make_collator, counting = supervised.make_collator, recipe.CountingCollator

    def logged_collator(*args: Any, **kwargs: Any) -> Any:
        collate = make_collator(*args, **kwargs)

        def logged(features: Any) -> Any:
            batch = collate(features)
            log.add(batch)
            return batch
        return logged

    class LoggedCounter(counting):  # type: ignore[misc, valid-type]
        def __call__(self, features: list[dict[str, Any]]) -> Any:
            batch = super().__call__(features)
            log.add(batch)
            return batch

    setattr(supervised, "make_collator", logged_collator)  # noqa: B010 - a module, patched
    setattr(recipe, "CountingCollator", LoggedCounter)  # noqa: B010
    try:
        yield
    finally:
        setattr(supervised, "make_collator", make_collator)  # noqa: B010
        setattr(recipe, "CountingCollator", counting)  # noqa: B010


# --------------------------------------------------------------------------- the check
@dataclass
class Row:
    case: str
    side: str
    tokens_per_second: float
    steady_tokens_per_second: float
    flops_per_token: float
    mfu: float | None
    peak_gb: float
    first_step_seconds: float
    padding: float
    vs_recipe: float | None = None
    skipped: str | None = None


def cells(row: Row) -> tuple[str, ...]:
    if row.skipped:
        return (row.case, row.side, f"skipped: {row.skipped}", "", "", "", "", "", "", "")
    return (row.case, row.side, f"{row.tokens_per_second:,.0f}",
            f"{row.steady_tokens_per_second:,.0f}", f"{row.flops_per_token / 1e9:.3g}",
            f"{row.mfu:.1%}" if row.mfu is not None else "n/a", f"{row.peak_gb:.1f}",
            f"{row.first_step_seconds:.1f}", f"{row.padding:.0%}",
            f"{row.vs_recipe:.2f}" if row.vs_recipe is not None else "")


HEADER = ("case", "side", "tok/s", "after step 1", "GFLOP/token", "MFU", "peak GB", "step 1 s",
          "padding", "B/A")


def table(rows: list[Row]) -> str:
    lines = [HEADER, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines if not line[2].startswith("skipped") or i < 2)
              for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny models, 3 steps: the same code path, anywhere")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, of {', '.join(CASES)} (default {DEFAULT_CASES})")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="side B with the job option gradient_checkpointing")
    parser.add_argument("--skip-recipe", action="store_true", help="side B only")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "gpu")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(CASES)}")

    import torch
    import transformers
    from transformers import AutoTokenizer

    from bench.recipe import Hyper, RunResult, train_recipe
    from bench.throughput import train_lorafleet
    from bench.workload import select_examples

    t_start = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; run with --dry-run to check the script on the "
              "CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
    steps = args.steps or (30 if cuda else 3)
    batch = args.batch_size if cuda else 2
    max_length = args.max_length if cuda else 256
    hp = Hyper(steps=steps, batch_size=batch, grad_accum=1, max_length=max_length,
               lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    work = args.work / ("cuda" if cuda else "dry-run")
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    peak = args.peak_tflops or (peak_tflops(gpu) if cuda else None)
    import peft

    print(f"gpu_check: {gpu}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}; {dtype}; {steps} steps × "
          f"batch {batch}, max_length {max_length}, LoRA r {args.lora_r}; peak "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}", flush=True)

    rows: list[Row] = []
    recipe_speed: dict[str, float] = {}  # model -> the recipe's tokens/s

    def measure(case: Case, side: str, config: dict[str, Any], train: Callable[..., RunResult],
                *args: Any, **kwargs: Any) -> Row:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        log = WorkLog(steps * hp.grad_accum)
        with logging_work(log):
            result = train(*args, label=side, **kwargs)
        flops = log.flops_per_real_token(config)
        steady = result.steady_tokens_per_second
        row = Row(case.name, side, result.tokens_per_second, steady, flops,
                  steady * flops / (peak * 1e12) if peak else None,
                  torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                  result.first_step_seconds, 1 - result.real_tokens / result.padded_tokens)
        gc.collect()
        print(f"  {case.name}, {side}: {row.tokens_per_second:,.0f} real tok/s "
              f"({time.monotonic() - t_start:.0f} s)", flush=True)
        return row

    interrupted = False
    try:
        for case in (CASES[n] for n in names):
            if case.quantization and not cuda:
                rows.append(Row(case.name, "B: lorafleet", 0, 0, 0, None, 0, 0, 0,
                                skipped="QLoRA needs CUDA"))
                continue
            config = (MODELS if cuda else TINY_MODELS)[case.model]
            model_dir, params = build(work / case.model / "model", config, device, dtype)
            gc.collect()
            size = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
            print(f"  {case.name}: {config['model_type']}, {size} parameters "
                  f"({time.monotonic() - t_start:.0f} s)", flush=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            train_file, _ = select_examples(tokenizer, "train", hp.examples, max_length,
                                            work / case.model / "train.jsonl", allow_fewer=True)
            options: dict[str, Any] = {}
            if args.gradient_checkpointing:
                options["gradient_checkpointing"] = True
            if case.quantization:
                options["quantization"] = case.quantization
            out = work / case.name
            b = measure(case, "B: lorafleet", config, train_lorafleet, model_dir, train_file,
                        out / "side-b", hp, device=device, **options)
            rows.append(b)
            if case.recipe and not args.skip_recipe:
                a = measure(case, "A: recipe", config, train_recipe, model_dir, train_file,
                            out / "side-a", hp, bf16=bf16, fp16=cuda and not bf16)
                rows.append(a)
                recipe_speed[case.model] = a.tokens_per_second
            if case.model in recipe_speed:
                b.vs_recipe = b.tokens_per_second / recipe_speed[case.model]
    except KeyboardInterrupt:  # the time limit (gpu_check.sh): report what finished
        interrupted = True

    print(f"\n{gpu}; {dtype}; LoRA r {args.lora_r}; {steps} steps × batch {batch}, "
          f"max_length {max_length}; total {time.monotonic() - t_start:.0f} s"
          + ("; INTERRUPTED at the time limit" if interrupted else ""))
    print(table(rows))
    print("GFLOP/token: executed FLOPs per real token (B skips the LM head, and on Phi the "
          "last layer's queries, attention and MLP, on positions without a target: not "
          "counted); MFU: from them, after step 1; B/A: real tok/s against the recipe's bf16 "
          "run of the same model.")
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({
        "device": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "dtype": str(dtype), "steps": steps, "batch_size": batch,
        "max_length": max_length, "lora_r": args.lora_r, "peak_tflops": peak,
        "interrupted": interrupted, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"results: {work / 'results.json'}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
