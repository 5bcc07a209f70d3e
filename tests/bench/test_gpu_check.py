"""``bench/gpu_check.sh``: its code path on the CPU with tiny models (``--dry-run``), the wheels
it installs on a machine without a package index, and the FLOPs it counts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
import zipfile
from importlib.metadata import packages_distributions, requires, version
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FETCH = REPO / "scripts" / "fetch_gpu_wheels.sh"


def run_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "GPU_CHECK"))}
    base["LORAFLEET_STORAGE_DIR"] = str(tmp_path / "storage")
    base["GPU_CHECK_WHEELS"] = str(tmp_path / "no-wheels")  # none, unless a test brings some
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args],
                          cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=600)


def required(name: str) -> set[str]:
    """What the installed distribution ``name`` requires (no extras)."""
    env = {**default_environment(), "extra": ""}
    try:
        lines = requires(name) or []
    except Exception:  # noqa: BLE001 - not installed here: nothing to follow
        return set()
    return {canonicalize_name(req.name) for req in map(Requirement, lines)
            if req.marker is None or req.marker.evaluate(env)}


def script_list(name: str) -> set[str]:
    """The names in one of scripts/fetch_gpu_wheels.sh's lists (``NAME=( ... )``)."""
    block = re.search(rf"^{name}=\((.*?)^\)", FETCH.read_text(), re.S | re.M)
    assert block, f"{name}=( ... ) not found in fetch_gpu_wheels.sh"
    words = " ".join(line.split("#", 1)[0] for line in block.group(1).splitlines()).split()
    return {canonicalize_name(w) for w in words}


def lorafleet_requires() -> set[str]:
    """What pyproject.toml asks for: the base, worker and gpu dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {canonicalize_name(Requirement(line).name)
            for line in [*project["dependencies"], *extras["worker"], *extras["gpu"]]}


def test_dry_run_trains_every_case_and_imports_nothing_the_wheels_lack(tmp_path: Path) -> None:
    done = run_check(tmp_path, "--dry-run", "--work", str(tmp_path), PYTHONPROFILEIMPORTTIME="1")
    assert done.returncode == 0, done.stderr[-3000:]

    lines = done.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split()[:4] == ["case", "side", "tok/s", "after"]
    rows = [re.split(r"\s{2,}", line) for line in lines[header + 1:header + 6]]
    assert [r[:2] for r in rows] == [
        ["phi2", "B: lorafleet"], ["phi2", "A: recipe"], ["phi2-qlora", "B: lorafleet"],
        ["llama8b", "B: lorafleet"], ["llama8b", "A: recipe"]]
    assert rows[2][2] == "skipped: QLoRA needs CUDA"
    results = json.loads((tmp_path / "dry-run" / "results.json").read_text())
    by = {(r["case"], r["side"][0]): r for r in results["rows"]}
    for key in [("phi2", "B"), ("phi2", "A"), ("llama8b", "B"), ("llama8b", "A")]:
        assert by[key]["tokens_per_second"] > 0 and by[key]["flops_per_token"] > 0, key
    # B runs the LM head (and on Phi the last layer) on the response alone: fewer FLOPs.
    assert by["phi2", "B"]["flops_per_token"] < by["phi2", "A"]["flops_per_token"]
    assert by["phi2", "B"]["vs_recipe"] > 0 and by["llama8b", "B"]["vs_recipe"] > 0
    # Side B went through the job path: a PEFT adapter with lorafleet's metadata.
    assert (tmp_path / "dry-run" / "phi2" / "side-b" / "adapter" / "lorafleet.json").is_file()

    # Every distribution the check imported that lorafleet or a fetched wheel requires is on
    # the GPU machine or among the wheels scripts/fetch_gpu_wheels.sh fetches: else the check
    # fails there at its first import. (What the machine's own packages import because it is
    # installed here, such as pyarrow's cloudpickle, is theirs to need or not.)
    modules = {m.group(1).split(".")[0] for m in
               re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", done.stderr, re.M)}
    owners = packages_distributions()
    imported = {canonicalize_name(d) for m in modules for d in owners.get(m, [])}
    fetched, machine = script_list("PACKAGES"), script_list("ON_THE_MACHINE")
    ours = lorafleet_requires().union(*(required(d) for d in fetched))
    missing = (imported & ours) - machine - fetched
    assert not missing, f"add to PACKAGES in scripts/fetch_gpu_wheels.sh: {sorted(missing)}"
    assert {"pydantic", "sqlalchemy", "datasets"} <= imported & fetched  # the check saw them


def fake_wheel(folder: Path, name: str, ver: str) -> Path:
    """A minimal pure-Python wheel of one empty package."""
    path = folder / f"{name}-{ver}-py3-none-any.whl"
    info = f"{name}-{ver}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{info}/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_this_python_lacks_are_installed_without_an_index(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    fake_wheel(wheels, "lorafleet_probe", "1.0")  # not installed: goes in
    fake_wheel(wheels, "pydantic", version("pydantic"))  # installed at that version: stays out

    done = run_check(tmp_path, "--help", GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(site),
                     PIP_NO_INDEX="1")

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"installed 1 wheels from {wheels} into {site}" in done.stdout
    assert (site / "lorafleet_probe" / "__init__.py").is_file()
    assert not (site / "pydantic").exists()


def test_fetch_script_takes_versions_from_the_pins_and_the_environment() -> None:
    """The script's version lookup, without downloading: a pinned name gets its pin, any other
    the version installed here."""
    text = FETCH.read_text()
    lookup = text[text.index("<<'EOF'\n") + len("<<'EOF'\n"):text.index("\nEOF\n")]
    python = REPO / ".venv" / "bin" / "python"
    done = subprocess.run([str(python) if python.exists() else "python3", "-", "datasets",
                           "pydantic", "bitsandbytes"], input=lookup, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pins = dict(line.split("==") for line in (REPO / "constraints" / "gpu.txt").read_text()
                .splitlines() if line and not line.startswith("#"))
    assert done.stdout.split() == [f"datasets=={pins['datasets']}",
                                   f"pydantic=={version('pydantic')}",
                                   f"bitsandbytes=={pins['bitsandbytes']}"]


@pytest.mark.parametrize("model", ["phi2", "llama8b"])
def test_counted_matmul_flops_agree_with_pytorchs_counter(model: str) -> None:
    """The executed FLOPs, attention aside, equal what PyTorch's FLOP counter sees in one
    training step of lorafleet's packed row and of the recipe's padded batch, up to LoRA's
    own (rank 1 here: well under 5 %)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.gpu_check import TINY_MODELS, Work, executed_flops, work_of
    from worker.attention import use_packed_attention
    from worker.collate import make_collator
    from worker.last_layer import run_last_layer_on_loss_positions
    from worker.preprocess import IGNORE_INDEX
    from worker.training.model import TARGET_MODULES

    config = TINY_MODELS[model]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields),
                                            attn_implementation="sdpa")
    base.config.use_cache = False
    assert use_packed_attention(base)
    last_layer = run_last_layer_on_loss_positions(base)
    peft_model = get_peft_model(base, LoraConfig(
        r=1, target_modules=TARGET_MODULES[config["model_type"]]))
    gen = torch.Generator().manual_seed(0)
    feats = []
    for length, prompt in [(90, 60), (120, 80), (40, 30), (200, 150)]:
        ids = torch.randint(3, config["vocab_size"], (length,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    longest = max(len(f["input_ids"]) for f in feats)
    ids = torch.tensor([f["input_ids"] + [0] * (longest - len(f["input_ids"])) for f in feats])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"]))
                         for f in feats])
    padded: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                              "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
    packed = make_collator(None, packing=True, last_layer=last_layer)(feats)

    for batch in (packed, padded):
        with FlopCounterMode(display=False) as counter:
            peft_model(**batch).loss.backward()
        work = work_of(batch)
        # The CPU's attention kernels are not in the counter: compare the matmuls.
        ours = executed_flops(config, Work(**{**vars(work), "pairs": 0, "last_pairs": 0}))
        assert ours <= counter.get_total_flops() <= 1.05 * ours
    assert work_of(packed).head_rows == packed["shift_labels"].numel() < work_of(padded).rows
