"""``python -m bench``: lorafleet's benchmarks (``make bench`` / ``make bench-full``).

Quick mode (default) is CI-sized: a small model, a few steps, the training-throughput
comparison only; it prints its table and, last, ``train-throughput ratio B/A: <x.xx>``.
Full mode (``--full``) trains the ~17 M-parameter model for longer, measures each technique
on its own, runs the service benchmarks, and rewrites the "Training throughput" section of
BENCHMARKS.md. Timings are wall-clock on whatever else the machine is doing: the load
average goes into the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import report, throughput

OUT = Path(__file__).resolve().parent / "out"


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full mode (tens of minutes)")
    parser.add_argument("--only", choices=["train", "service"], default=None,
                        help="run one benchmark (default: quick: train; full: both)")
    parser.add_argument("--no-techniques", action="store_true",
                        help="full mode: skip the one-technique-at-a-time runs")
    parser.add_argument("--compile", action="store_true",
                        help="full mode: also measure torch.compile (compiling takes minutes)")
    parser.add_argument("--write", action="store_true",
                        help="write BENCHMARKS.md (full mode does unless --no-write)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, for both sides and the service's worker "
                        "(default 1; 0: torch's default, one per core). On a machine that "
                        "runs anything else, a process's threads wait for each other at every "
                        "op and the figures measure the neighbours")
    parser.add_argument("--work", type=Path, default=OUT, help=f"scratch folder (default {OUT})")
    args = parser.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    plan = throughput.FULL if args.full else throughput.QUICK
    todo = [args.only] if args.only else (["train", "service"] if args.full else ["train"])
    work = args.work / plan.name
    work.mkdir(parents=True, exist_ok=True)
    where = report.machine()
    _log(f"lorafleet benchmarks, {plan.name} mode: {', '.join(todo)}\n  {where}")
    blocks: list[tuple[str, str]] = []
    ratio: float | None = None
    t0 = time.monotonic()

    if "train" in todo:
        _log("\n== training throughput: recipe (A) vs lorafleet (B)")
        load0 = report.load()
        outcome = throughput.run(plan, work, _log, techniques=not args.no_techniques,
                                 compile_=args.compile)
        throughput.check_same_work(outcome)
        md = report.training_tables(outcome, where, (load0, report.load()))
        blocks.append((report.TRAIN_KEY, md))
        ratio = outcome.ratio
        _log("\n" + md)

    if "service" in todo:
        from bench import service

        _log("\n== service overhead, queue latency, API under training load")
        load0 = report.load()
        hp = throughput.SERVICE_HYPER
        model_dir, _ = throughput.build_service_model(work)
        from transformers import AutoTokenizer

        from bench.workload import select_examples

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        train_file, _ = select_examples(tok, "train", hp.examples, hp.max_length,
                                        work / "data" / "service-train.jsonl")
        s_out = service.run(model_dir, train_file, hp, work, log=_log,
                            threads=args.threads or None)
        md = report.service_tables(s_out, where, (load0, report.load()))
        blocks.append((report.SERVICE_KEY, md))
        _log("\n" + md)

    if (args.full and not args.no_write) or args.write:
        report.write_section(blocks)
        _log(f"\nwrote the '{report.SECTION}' section of {report.BENCHMARKS}")
    _log(f"({time.monotonic() - t0:.0f} s)")
    if ratio is not None:
        print(f"train-throughput ratio B/A: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
