"""Reading a W&B offline run the supported way: ``wandb leet inspect --json`` prints the
records of a run's ``.wandb`` transaction log, one JSON object per line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def wandb_records(run: Path) -> list[dict[str, Any]]:
    """The records of an offline run (its folder or its ``.wandb`` file), in order."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)],
                         capture_output=True, text=True, timeout=120, check=True,
                         stdin=subprocess.DEVNULL).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wandb_history(run: Path) -> dict[int, dict[str, Any]]:
    """What the run logged, by step (the values of all ``history`` records of a step)."""
    steps: dict[int, dict[str, Any]] = {}
    for record in wandb_records(run):
        if record.get("type") == "history":
            item = record["history"]["item"]
            steps.setdefault(int(item["_step"]), {}).update(item)
    return steps


def wandb_run_record(run: Path) -> dict[str, Any]:
    """The run's ``run`` record: project, entity, name, tags, config."""
    return next(r["run"] for r in wandb_records(run) if r.get("type") == "run")
