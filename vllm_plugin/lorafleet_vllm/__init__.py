"""lorafleet's vLLM plugin, installed in the inference engine's vLLM environment.

vLLM calls :func:`register` in each of its processes (entry point ``vllm.general_plugins``).
It changes nothing unless the process was started with one of these variables, which
``lorafleet serve`` sets on the servers it starts on a CPU host:

- ``LORAFLEET_VLLM_CPU_LORA=grouped`` (setting ``LORAFLEET_VLLM_CPU_LORA_OPS``): vLLM's CPU
  platform uses :class:`~lorafleet_vllm.cpu_lora.PunicaWrapperCPUGrouped` for LoRA;
- ``LORAFLEET_VLLM_CPU_SCHEDULING=idle`` (setting ``LORAFLEET_VLLM_CPU_SCHEDULING``): the
  processes that run the model (vLLM's engine core and its workers) are scheduled with Linux's
  ``SCHED_IDLE``, so that they compute on the CPU time that every other process leaves; the
  server's HTTP front end keeps its priority.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

ENV = "LORAFLEET_VLLM_CPU_LORA"
WRAPPER = "lorafleet_vllm.cpu_lora.PunicaWrapperCPUGrouped"
SCHEDULING_ENV = "LORAFLEET_VLLM_CPU_SCHEDULING"
# vLLM's processes that run the model: its engine core ("EngineCore", "EngineCore_DP<i>")
# and the workers of its multiprocessing executor ("VllmWorker-<rank>").
COMPUTE_PROCESSES = ("EngineCore", "VllmWorker")

# Under vLLM's logger, whose handler writes to the server's log.
log = logging.getLogger("vllm.lorafleet")


def register() -> None:
    if os.environ.get(SCHEDULING_ENV) == "idle":
        compute_at_idle_priority(multiprocessing.current_process().name)
    if os.environ.get(ENV) == "grouped":
        from vllm.platforms import cpu

        cpu.CpuPlatform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)  # type: ignore[method-assign]


def compute_at_idle_priority(process: str) -> bool:
    """In one of vLLM's compute processes (named ``process``), schedule every thread with
    ``SCHED_IDLE``; the threads it starts later inherit it. Returns whether it did."""
    if not process.startswith(COMPUTE_PROCESSES) or not hasattr(os, "SCHED_IDLE"):
        return False
    param = os.sched_param(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, param)
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    log.info("lorafleet: %s (pid %d) runs with SCHED_IDLE", process, os.getpid())
    return True
