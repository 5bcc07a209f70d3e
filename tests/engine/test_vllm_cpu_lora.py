"""lorafleet's vLLM plugin (``vllm_plugin/``): its CPU LoRA ops give what vLLM's give, token
by token, on the calls vLLM's LoRA layers make, and vLLM uses them only when asked. Run with
the vLLM environment's Python, where the plugin is installed; the servers' own greedy output is
checked against peft in ``test_vllm.py``, where they run with these ops."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import VLLM_PYTHON, vllm_available

pytestmark = pytest.mark.skipif(
    not vllm_available() and not os.environ.get("CI"),
    reason="no .venv-vllm (`make venv-vllm`; make test creates it where vLLM installs)")

HERE = Path(__file__).resolve().parent


def vllm_python(*args: str, env: dict[str, str] | None = None) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment.update(env or {})
    done = subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True,
                          timeout=300, env=environment, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, Any]]:
    return dict(json.loads(vllm_python(str(HERE / "cpu_lora_ops.py"))))


@pytest.mark.parametrize("name", [
    "decode, rank 8", "prefill, rank 8", "decode, rank-8 adapters in rank-64 slots",
    "prefill, rank 64", "decode, one token", "decode, no adapter", "decode, bfloat16"])
def test_the_grouped_ops_add_each_tokens_own_adapter(cases: dict[str, dict[str, Any]],
                                                      name: str) -> None:
    case = cases[name]
    # The reference is right where vLLM's own ops agree with it.
    assert case["vllm"] <= case["tol"]
    assert case["grouped"] <= case["tol"]
    assert case["base_rows_untouched"]  # tokens without an adapter get nothing
    # add_shrink into one buffer for all slices, then add_expand overwriting the output.
    assert case["overwritten"] <= case["tol"]
    assert case["overwritten_base_rows_zero"]


@pytest.mark.parametrize(("env", "wrapper"), [
    ({}, "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"),
    ({"LORAFLEET_VLLM_CPU_LORA": "grouped"}, "lorafleet_vllm.cpu_lora.PunicaWrapperCPUGrouped"),
    ({"LORAFLEET_VLLM_CPU_LORA": "vllm"}, "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"),
])
def test_vllm_uses_the_grouped_ops_only_when_asked(env: dict[str, str], wrapper: str) -> None:
    script = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
              "from vllm.platforms.cpu import CpuPlatform; print(CpuPlatform.get_punica_wrapper())")
    assert vllm_python("-c", script, env=env) == wrapper


def test_the_plugin_is_found_in_the_vllm_environment_only() -> None:
    import sys

    from engine.vllm.servers import plugin_installed

    assert plugin_installed(str(VLLM_PYTHON))
    assert not plugin_installed(sys.executable)
    assert not plugin_installed(None)
