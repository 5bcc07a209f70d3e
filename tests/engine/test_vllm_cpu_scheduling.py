"""lorafleet's vLLM plugin schedules the processes that run the model with ``SCHED_IDLE``
(``LORAFLEET_VLLM_CPU_SCHEDULING``), and only those: tried in a process of its own (a test
process scheduled that way would be the one slowed down). vLLM's real processes are checked
in ``test_vllm.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "vllm_plugin"

SCRIPT = """
import json, os, threading
from lorafleet_vllm import compute_at_idle_priority

def threads():
    return [int(t) for t in os.listdir("/proc/self/task")]

def policies():
    found = set()
    for t in threads():
        try:
            found.add(os.sched_getscheduler(t))
        except ProcessLookupError:  # a thread that ended meanwhile (a joined one may linger)
            pass
    return sorted(found)

started = threading.Event()
stop = threading.Event()
def wait():
    started.set()
    stop.wait()
# A thread that exists when vLLM loads the plugin (a daemon: whatever goes wrong below, the
# script ends).
before = threading.Thread(target=wait, daemon=True)
before.start()
started.wait()
try:
    out = {"front_end": compute_at_idle_priority("MainProcess"),
           "after_front_end": policies()}
    out["core"] = compute_at_idle_priority(NAME)
    later = []
    thread = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0)))
    thread.start()
    thread.join()
    out["after_core"] = policies()
    out["later_thread"] = later[0]
finally:
    # Back to normal at once: at SCHED_IDLE this process would wait for a busy machine to idle.
    for t in threads():
        try:
            os.sched_setscheduler(t, os.SCHED_OTHER, os.sched_param(0))
        except ProcessLookupError:
            pass
    stop.set()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's scheduling policies")
@pytest.mark.parametrize("name", ["EngineCore", "EngineCore_DP0", "VllmWorker-0"])
def test_the_model_processes_and_every_thread_of_theirs_go_idle(name: str) -> None:
    # No timeout of its own: between going idle and going back, the script runs only when
    # nothing else wants a core, which on a busy machine may take minutes; pytest's timeout
    # still catches a hang.
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("NAME", repr(name))], check=True,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PLUGIN)})
    out = json.loads(done.stdout)
    assert out["front_end"] is False
    assert out["after_front_end"] == [os.SCHED_OTHER]  # vLLM's HTTP server is left alone
    assert out["core"] is True
    assert out["after_core"] == [os.SCHED_IDLE]  # the thread started before too
    assert out["later_thread"] == os.SCHED_IDLE  # and those started after inherit it
