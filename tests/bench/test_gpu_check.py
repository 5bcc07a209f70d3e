"""``bench/gpu_check.sh --dry-run``: the GPU check's code path, on the CPU with a tiny model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_trains_both_sides_and_prints_the_table(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["LORAFLEET_STORAGE_DIR"] = str(tmp_path / "storage")
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("side "))
    assert lines[header].split()[:3] == ["side", "tok/s", "tok/s"]
    sides = [line.split("  ")[0] for line in lines[header + 1:header + 3]]
    assert sides == ["B: lorafleet", "A: recipe"]
    assert lines[-1].startswith("ratio B/A: ")
    assert float(lines[-1].split()[2]) > 0
    # Side B went through the job path: a PEFT adapter with lorafleet's metadata.
    assert (tmp_path / "dry-run" / "side-b" / "adapter" / "lorafleet.json").is_file()
