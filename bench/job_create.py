"""Job creation answers without reading the training file (``python -m bench.job_create``).

Starts ``lorafleet api`` (SQLite, filesystem broker, no worker) on a free port, uploads a
~100 MB JSONL training file and a one-record file, then creates jobs on each in turn over HTTP
and reports the creation latency of both. Since a job starts ``validating_files`` and its
file is checked after the response, the ratio big/small should stay near 1.0 whatever the
file's size; the time until the big file's job reaches ``queued`` (the background check) is
reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from shared.records import validate_file
from shared.templates import PromptFormat

RECORD_BYTES = 1_000  # a DialogSum-sized record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_jsonl(path: Path, size: int) -> int:
    """A training file of about ``size`` bytes of dialogue/summary records; its line count."""
    dialogue = "#Person1#: " + "How are you doing today? " * (RECORD_BYTES // 26)
    lines = 0
    with path.open("w") as f:
        while f.tell() < size:
            f.write(json.dumps({"dialogue": f"{dialogue}{lines}", "summary": "They talk."}))
            f.write("\n")
            lines += 1
    return lines


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(size_mb: float, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        root = Path(tmp)
        models = root / "models"
        (models / "base").mkdir(parents=True)  # the request names it; nothing loads it
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
        env.update({"LORAFLEET_STORAGE_DIR": str(root / "storage"),
                    "LORAFLEET_CACHE_DIR": str(root / "cache"),
                    "LORAFLEET_MODELS_DIR": str(models), "LORAFLEET_PORT": str(port),
                    "LORAFLEET_MAX_QUEUED_JOBS_PER_PROJECT": str(4 * jobs + 10),
                    # room for the file plus its multipart framing
                    "LORAFLEET_MAX_UPLOAD_BYTES": str(int(size_mb * 2**20) + 2**24)})
        _cli(env, "migrate")
        key = _cli(env, "keys", "create", "--project", "bench")
        big, small = root / "big.jsonl", root / "small.jsonl"
        lines = _write_jsonl(big, int(size_mb * 1024 * 1024))
        file_mb = big.stat().st_size / 2**20
        # What creation cost when it read the file on the request path: one full check.
        t = time.perf_counter()
        validate_file(big, prompt_format=PromptFormat.parse("dolly"), param="training_file")
        scan_s = time.perf_counter() - t
        _write_jsonl(small, 1)
        server = subprocess.Popen([sys.executable, "-m", "cli.main", "api"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                headers={"Authorization": f"Bearer {key}"})
            for _ in range(600):
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            files = {}
            upload_s = {}
            for name, path in (("big", big), ("small", small)):
                t = time.perf_counter()
                with path.open("rb") as f:
                    r = http.post("/v1/files", files={"file": (path.name, f)},
                                  data={"purpose": "fine-tune"})
                upload_s[name] = time.perf_counter() - t
                r.raise_for_status()
                files[name] = r.json()["id"]
            latency: dict[str, list[float]] = {"big": [], "small": []}
            first_big: str | None = None
            for i in range(jobs * 2):
                name = "big" if i % 2 == 0 else "small"
                body = {"model": str(models / "base"), "training_file": files[name]}
                t = time.perf_counter()
                r = http.post("/v1/fine_tuning/jobs", json=body)
                latency[name].append(time.perf_counter() - t)
                r.raise_for_status()
                assert r.json()["status"] == "validating_files", r.text
                first_big = first_big or r.json()["id"]
            t = time.perf_counter()
            while http.get(f"/v1/fine_tuning/jobs/{first_big}").json()["status"] not in (
                    "queued", "failed"):
                time.sleep(0.2)
            queued_after = time.perf_counter() - t
        finally:
            server.terminate()
            server.wait(30)
    big_p50 = statistics.median(latency["big"])
    small_p50 = statistics.median(latency["small"])
    return {
        "file_mb": round(file_mb, 1),
        "lines": lines, "jobs_each": jobs,
        "upload_big_s": round(upload_s["big"], 2),
        "create_big_p50_ms": round(1000 * big_p50, 1),
        "create_big_p95_ms": round(1000 * _percentile(latency["big"], 0.95), 1),
        "create_big_max_ms": round(1000 * max(latency["big"]), 1),
        "create_small_p50_ms": round(1000 * small_p50, 1),
        "full_check_of_big_file_ms": round(1000 * scan_s, 1),
        "ratio_big_small_p50": round(big_p50 / small_p50, 2),
        "validation_after_last_create_s": round(queued_after, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_create", description=__doc__)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--jobs", type=int, default=20, help="jobs created on each file")
    args = parser.parse_args(argv)
    result = run(args.size_mb, args.jobs)
    for k, v in result.items():
        print(f"{k}: {v}")
    print(f"job-create ratio big/small: {result['ratio_big_small_p50']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
