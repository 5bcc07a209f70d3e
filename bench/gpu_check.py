"""GPU check: LoRA on a Phi-2-sized model through lorafleet's training path, and the recipe.

Builds a random-init ``PhiForCausalLM`` with Phi-2's real configuration (2.7 B parameters;
nothing is downloaded: the tokenizer is trained here on the bundled sample), trains LoRA r=16
for a fixed number of steps at ``max_length`` 512 with lorafleet's training path (side B:
``prepare`` + ``train_adapter``, bf16 autocast where the GPU has it, fp16 otherwise), then the
seed recipe (side A) the same way, and prints tokens/s, MFU and peak GPU memory of each.

MFU counts, per real token, 4 × the parameters (less the input embedding, a lookup): forward
2N and the backward's activation gradients 2N, as the frozen base needs no weight gradients;
plus causal attention, 6 × layers × hidden × the sample's length (forward 2, backward 4), at
the GPU's dense bf16 peak. Both sides are counted the same way, so B, which runs the LM head
on response positions only, gets an *effective* MFU.

``--dry-run`` runs the same code on the CPU with a tiny model, to check the script anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

PHI2 = {  # microsoft/phi-2 config.json, as transformers 5 reads it
    "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
    "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "resid_pdrop": 0.1,
    "embd_pdrop": 0.0, "attention_dropout": 0.0, "qk_layernorm": False,
    "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
}
TINY = {**PHI2, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}

# Dense bf16 peak TFLOP/s by device-name fragment (first match wins); --peak-tflops overrides.
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0)]


def peak_tflops(name: str) -> float | None:
    for fragment, value in PEAKS:
        if fragment in name:
            return value
    return None


def build(dest: Path, config: dict[str, Any], device: str, dtype: Any) -> tuple[Path, int]:
    """Random-init Phi with ``config`` and an offline tokenizer, saved to ``dest`` (reused when
    the config matches). Returns the folder and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

    from worker.tiny_model import build_tokenizer

    stamp = dest / "gpu-check.json"
    wanted = {"config": config, "dtype": str(dtype)}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        model = None
    else:
        dest.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(vocab_size=min(8192, config["vocab_size"]))
        cfg = PhiConfig(**{**config, "pad_token_id": tokenizer.pad_token_id,
                           "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id})
        # Initialised on the device, in the training dtype: no 11 GB float32 copy on the host.
        with torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        assert isinstance(model, PhiForCausalLM)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        stamp.write_text(json.dumps(wanted))
        del model
    from safetensors import safe_open

    params = 0
    for shard in dest.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
    return dest, params


def attention_flops_per_token(train_file: Path, tokenizer: Any, config: dict[str, Any]) -> float:
    """Causal attention FLOPs per token (forward + backward), token-weighted over the examples:
    a token of an n-token sample attends to n/2 keys on average; QK and AV are 2 FLOPs a
    multiply-add each (forward 4·d·n/2), backward twice the forward."""
    from bench.workload import read_records, render_record

    lengths = []
    for record in read_records(train_file):
        r = render_record(record)
        lengths.append(len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) + 1)
    weighted = sum(n * n for n in lengths) / sum(lengths)
    return 3 * 4 * config["hidden_size"] * config["num_hidden_layers"] * weighted / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, 2 steps: the same code path, anywhere")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="side B with the job option gradient_checkpointing")
    parser.add_argument("--quantization", choices=["4bit"], default=None,
                        help="side B with the job option quantization (QLoRA)")
    parser.add_argument("--skip-recipe", action="store_true", help="side B only")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "gpu")
    args = parser.parse_args(argv)

    import torch
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
    config = PHI2 if cuda else TINY
    steps = args.steps or (30 if cuda else 3)
    batch = args.batch_size if cuda else 2
    max_length = args.max_length if cuda else 256
    hp = Hyper(steps=steps, batch_size=batch, grad_accum=1, max_length=max_length,
               lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    work = args.work / ("phi2" if cuda else "dry-run")
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    peak = args.peak_tflops or (peak_tflops(gpu) if cuda else None)
    print(f"gpu_check: {gpu}, {dtype}, {steps} steps × batch {batch}, max_length "
          f"{max_length}, LoRA r {args.lora_r}", flush=True)

    model_dir, params = build(work / "model", config, device, dtype)
    gc.collect()
    size = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    print(f"  model: {size} parameters ({time.monotonic() - t_start:.0f} s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_file, _ = select_examples(tokenizer, "train", hp.examples, max_length,
                                    work / "train.jsonl", allow_fewer=True)
    dense = params - config["vocab_size"] * config["hidden_size"]  # less the embedding lookup
    flops_per_token = 4 * dense + attention_flops_per_token(train_file, tokenizer, config)

    sides: list[tuple[RunResult, float]] = []

    def measure(run: Any) -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = run()
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        sides.append((result, peak_gb))
        gc.collect()
        print(f"  {result.label}: {result.tokens_per_second:,.0f} real tok/s "
              f"({time.monotonic() - t_start:.0f} s)", flush=True)

    options: dict[str, Any] = {}
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    if args.quantization:
        options["quantization"] = args.quantization
    measure(lambda: train_lorafleet(model_dir, train_file, work / "side-b", hp,
                                    label="B: lorafleet", device=device, **options))
    if not args.skip_recipe:
        measure(lambda: train_recipe(model_dir, train_file, work / "side-a", hp,
                                     label="A: recipe", bf16=bf16,
                                     fp16=cuda and not bf16))

    rows = []
    for result, peak_gb in sides:
        steady = result.steady_tokens_per_second
        mfu = f"{steady * flops_per_token / (peak * 1e12):.1%}" if peak else "n/a"
        rows.append((result.label, f"{result.tokens_per_second:,.0f}", f"{steady:,.0f}", mfu,
                     f"{peak_gb:.1f}", f"{result.first_step_seconds:.1f}",
                     f"{1 - result.real_tokens / result.padded_tokens:.0%}"))
    header = ("side", "tok/s", "tok/s after step 1", "MFU", "peak GB", "step 1 s", "padding")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{gpu}; {size} params, {dtype}, LoRA r {args.lora_r}, {steps} "
          f"steps × batch {batch}, max_length {max_length}; "
          f"{flops_per_token / 1e9:.2f} GFLOP/token; peak "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; "
          f"total {time.monotonic() - t_start:.0f} s")
    for line in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    if len(sides) == 2:
        b, a = sides[0][0], sides[1][0]
        steady = (f"{b.steady_tokens_per_second / a.steady_tokens_per_second:.2f}"
                  if a.steady_tokens_per_second else "n/a")
        print(f"ratio B/A: {b.tokens_per_second / a.tokens_per_second:.2f} (after step 1: "
              f"{steady})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
