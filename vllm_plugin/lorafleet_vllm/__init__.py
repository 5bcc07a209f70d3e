"""lorafleet's vLLM plugin, installed in the inference engine's vLLM environment.

vLLM calls :func:`register` in each of its processes (entry point ``vllm.general_plugins``).
It changes nothing unless the process was started with ``LORAFLEET_VLLM_CPU_LORA=grouped``,
which ``lorafleet serve`` sets on the servers it starts on a CPU host
(``LORAFLEET_VLLM_CPU_LORA_OPS``): vLLM's CPU platform then uses
:class:`~lorafleet_vllm.cpu_lora.PunicaWrapperCPUGrouped` for LoRA.
"""

from __future__ import annotations

import os

ENV = "LORAFLEET_VLLM_CPU_LORA"
WRAPPER = "lorafleet_vllm.cpu_lora.PunicaWrapperCPUGrouped"


def register() -> None:
    if os.environ.get(ENV) != "grouped":
        return
    from vllm.platforms import cpu

    cpu.CpuPlatform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)  # type: ignore[method-assign]
