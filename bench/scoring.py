"""Scoring through the API, against lm-evaluation-harness's own ``hf`` backend, in one run.

1. A multiple-choice set from the bundled DialogSum sample (which summary belongs to the
   dialogue; 70 dialogues x 3 choices = 210 loglikelihoods) scored by lm-eval twice, with the
   same adapter: ``local-completions`` through the API (the engine on vLLM, which batches the
   scoring; the server started beforehand) and ``hf`` with ``peft=`` in this machine's torch.
   Goal: the API at least 3x faster. The accuracies must be equal.
2. Generation throughput with ``logprobs: 5`` against without: 32 concurrent completions of 64
   tokens over one adapter. Goal: at most 1.2x the time.

Run: ``python -m bench.scoring`` (prints one JSON object; BENCHMARKS.md, "Scoring").
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.serving_fixtures import build_adapter, build_model
from bench.serving_latency import LiveService

DOCS = 70
CHOICES = 3


def write_task(folder: Path) -> Path:
    from shared.samples import SAMPLE_PATH

    records = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()][:DOCS]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "mc.jsonl").open("w") as out:
        for i, r in enumerate(records):
            choices = [records[(i + 7 * j) % len(records)]["summary"] for j in range(CHOICES)]
            out.write(json.dumps({"context": f"Dialogue:\n{r['dialogue']}\nSummary:",
                                  "choices": choices, "gold": 0}) + "\n")
    (folder / "mc.yaml").write_text(
        "task: bench_dialogsum_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n")
    return folder


def lm_eval(args: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Seconds of one lm-eval run (process start to exit) and its accuracy."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(out)],
                         env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(run.stdout[-2000:] + run.stderr[-4000:])
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return seconds, float(results["results"]["bench_dialogsum_mc"]["acc,none"])


def generation(url: str, key: str, model: str, logprobs: int | None) -> float:
    """Tokens per second of 32 concurrent 64-token completions."""
    import openai

    from bench.serving_fixtures import prompts

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=1200)
    extra = {"logprobs": logprobs} if logprobs is not None else {}

    def one(prompt: str) -> int:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=64,
                                           temperature=0, extra_body={"raw_prompt": True},
                                           **extra)
        assert answer.usage is not None
        return answer.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        tokens = sum(pool.map(one, prompts(32)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root / "model")
        adapter = build_adapter(model, root / "adapter", seed=7, probe=True)
        tasks = write_task(root / "tasks")
        service = LiveService(root / "service", model, [adapter], threads=1, max_batch=32)
        service.start()
        try:
            service.start_engine({"LORAFLEET_ENGINE_BACKEND": "vllm"})
            name = service.names[0]
            env = {**service.env, "OPENAI_API_KEY": service.key, "HF_DATASETS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
            generation(service.url, service.key, name, None)  # starts vLLM, loads the adapter
            common = ["--tasks", "bench_dialogsum_mc", "--include_path", str(tasks)]
            api_s, api_acc = lm_eval(
                ["--model", "local-completions", "--model_args",
                 f"model={name},base_url={service.url}/v1/completions,tokenizer={model},"
                 "tokenized_requests=True,num_concurrent=8,max_retries=1", *common],
                root / "api", env)
            hf_s, hf_acc = lm_eval(
                ["--model", "hf", "--model_args",
                 f"pretrained={model},peft={adapter},dtype=float32", "--device", "cpu",
                 "--batch_size", "8", *common], root / "hf", env)
            plain = generation(service.url, service.key, name, None)
            with_logprobs = generation(service.url, service.key, name, 5)
        finally:
            service.stop_engine()
            if service.api is not None:
                service.api.terminate()
                service.api.wait(30)
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor()}",
        "choices_scored": DOCS * CHOICES,
        "lm_eval_api_seconds": round(api_s, 1), "lm_eval_hf_seconds": round(hf_s, 1),
        "api_speedup": round(hf_s / api_s, 2), "accuracy_api": api_acc, "accuracy_hf": hf_acc,
        "tokens_per_s": round(plain, 1), "tokens_per_s_logprobs5": round(with_logprobs, 1),
        "logprobs_time_ratio": round(plain / with_logprobs, 3)}, indent=2))


if __name__ == "__main__":
    main()
