"""The vLLM environment of the tests, and the one vLLM server of the tiny model that the serving
stacks of a test session share.

A vLLM server takes close to a minute to start on a small machine. The stacks of the serving
tests name the shared one to their engines in ``LORAFLEET_VLLM_SERVERS``, as an operator names
the vLLM service of compose; it is started as the engine starts a managed server (the same
command line and environment), so what the engine sends it is served alike.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import REPO_ROOT

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
# The --max-lora-rank of the shared server: the largest adapter the sharing modules serve.
SHARED_VLLM_RANK = 16
# The shared server's log, attached to a failing test's report.
SHARED_VLLM_LOGS: list[Path] = []
# The node id of the last test module of the run that starts a serving stack: the shared
# server is stopped after it, not held through the rest of the session.
LAST_SERVING_MODULE = pytest.StashKey[str]()


def vllm_available() -> bool:
    """Whether `make venv-vllm` made the vLLM environment (it does wherever vLLM installs)."""
    return VLLM_PYTHON.is_file()


class SharedVllm:
    """The vLLM server of ``model`` at rank :data:`SHARED_VLLM_RANK`, started by
    :meth:`start` with the engine's own :class:`~engine.vllm.servers.ServerManager`.

    Args:
        model: the base model's folder.
        log_dir: where the server logs.
    """

    def __init__(self, model: Path, log_dir: Path):
        from shared.settings import Settings

        self.model = model
        self.settings = Settings(engine_device="cpu", vllm_python=str(VLLM_PYTHON),
                                 vllm_max_lora_rank=SHARED_VLLM_RANK,
                                 vllm_adaptive_lora_rank=False, vllm_startup_seconds=900)
        self._log_dir = log_dir
        # The manager runs on an event loop of its own thread, which lives as long as the
        # server: the test's may be taken (Playwright's), and a server dies with the thread
        # that started it (the engine's parent-death signal).
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shared-vllm",
                                        daemon=True)
        self._manager: Any = None  # the ServerManager that starts it
        self.server: Any = None  # a VllmServer, once started

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def pid(self) -> int:
        return int(self.server.process.pid)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> SharedVllm:
        """Start the server; returns once it answers.

        Raises:
            ServiceUnavailable: it exited or did not answer (the message names its log).
        """
        import httpx

        from engine.vllm.servers import ServerManager
        from modelio.model_text import ModelText

        async def start() -> Any:
            client = httpx.AsyncClient(timeout=30)
            self._manager = ServerManager(self.settings, str(VLLM_PYTHON), self._log_dir,
                                          client, cpu=True)
            text = ModelText(str(self.model), max_context=self.settings.vllm_max_model_len)
            return await self._manager.get(text, SHARED_VLLM_RANK)

        self._thread.start()
        # As the serving stacks run their engines, and so the servers those start: offline,
        # one thread per process.
        with pytest.MonkeyPatch.context() as env:
            for name, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                "TRANSFORMERS_OFFLINE": "1"}.items():
                env.setenv(name, value)
            try:
                self.server = self._run(start())
            finally:
                SHARED_VLLM_LOGS.extend(sorted(self._log_dir.glob("*.log")))
        return self

    def stop(self) -> None:
        """Stop the server (and its engine-core processes) and the thread."""
        if not self._thread.is_alive():
            return
        if self._manager is not None:
            self._run(self._manager.stop_all())
            self._run(self._manager.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def engine_settings(self, own: dict[str, Any], module: str) -> dict[str, Any]:
        """The settings that have an engine serve the model on this server, over the
        module's ``own`` settings.

        Raises:
            ValueError: ``own`` asks for adapters of a higher rank than this server's.
            RuntimeError: the server was stopped already.
        """
        if not self._thread.is_alive():
            raise RuntimeError(f"{module}: the shared vLLM server was stopped after the last "
                               "module that the collection found to start a serving stack")
        rank = own.get("vllm_max_lora_rank", SHARED_VLLM_RANK)
        if rank > SHARED_VLLM_RANK:
            raise ValueError(f"{module}: vllm_max_lora_rank {rank} is above the shared vLLM "
                             f"server's {SHARED_VLLM_RANK}: set SERVING_OWN_VLLM = True")
        return {"vllm_servers": json.dumps({str(self.model): self.url}),
                "vllm_max_lora_rank": rank}
