"""The vLLM server manager's lifecycle, with a stand-in for vLLM (an HTTP server that answers
``/health`` and ``/v1/models``): servers start on demand at the LoRA rank their adapters need,
are replaced by a wider one for a larger adapter once their requests are done, make room for
each other, stop when idle, are reported once when they die, and say why they did not start.
Also which backend ``lorafleet serve`` picks. Real vLLM runs in ``test_vllm.py``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.errors import Overloaded, ServiceUnavailable
from shared.settings import Settings
from tests.engine.conftest import run

FAKE_VLLM = '''
import http.server, json, os, sys
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
print("fake vLLM", " ".join(args), flush=True)
if os.environ.get("FAKE_VLLM_FAIL"):
    print("ValueError: Unsupported CPU attention configuration: head_dim=16", flush=True)
    sys.exit(3)
if os.environ.get("FAKE_VLLM_SILENT"):
    import time; time.sleep(3600)
hold = os.environ.get("FAKE_VLLM_HOLD_RANK", "").split(":")  # "<rank>:<file>": wait for it
if hold[0] and args[args.index("--max-lora-rank") + 1] == hold[0]:
    import time
    while not os.path.exists(hold[1]):
        time.sleep(0.05)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        models = {"data": [{"id": name, "parent": None}]}
        body = {"/health": {}, "/v1/models": models}.get(self.path)
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """An executable that stands in for the vLLM environment's Python."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return str(python)


@pytest.fixture
def other_model(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "other-model"))


@pytest.fixture
def manager(fake_python: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``manager(**settings)``: a ServerManager on the fake vLLM; ``run(coro)`` runs its
    coroutines. Servers left running are stopped at the end."""
    from engine.vllm.servers import ServerManager

    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        settings = Settings(**{"vllm_startup_seconds": 60, **overrides})
        client = httpx.AsyncClient(timeout=10)
        servers = ServerManager(settings, fake_python, tmp_path / "logs", client, cpu=True)
        made.append(servers)
        return servers

    yield make
    for servers in made:
        for server in [*servers, *servers._retiring]:
            servers._stop_process(server)


def text_of(path: Path) -> Any:
    from modelio.model_text import ModelText

    return ModelText(str(path), max_context=512)


def test_the_command_line_and_environment_follow_the_settings(manager: Any,
                                                              tiny_model: Path) -> None:
    servers = manager(vllm_max_loras=3, vllm_max_cpu_loras=2, vllm_max_lora_rank=32,
                      vllm_adaptive_lora_rank=False,
                      vllm_kv_cache_gib=2)
    argv = servers.command(text_of(tiny_model), 1234)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in argv and "--enforce-eager" in argv
    assert argv[argv.index("--model") + 1] == str(tiny_model)
    assert argv[argv.index("--served-model-name") + 1] == str(tiny_model)
    assert argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # only the gateway reaches it
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert argv[argv.index("--max-cpu-loras") + 1] == "3"  # never below --max-loras
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    assert argv[argv.index("--max-model-len") + 1] == "512"  # the model's 1024, capped
    assert argv[argv.index("--dtype") + 1] == "float32"
    env = servers.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"


@pytest.mark.parametrize(("setting", "installed", "cpu", "ops"), [
    ("grouped", True, True, "grouped"), ("grouped", False, True, "vllm"),
    ("vllm", True, True, "vllm"), ("grouped", True, False, None)])
def test_cpu_servers_compute_lora_with_the_plugin_where_it_is_installed(
        manager: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, setting: str, installed: bool, cpu: bool,
        ops: str | None) -> None:
    from engine.vllm import servers as module

    asked: list[str | None] = []
    monkeypatch.setattr(module, "plugin_installed",
                        lambda python: asked.append(python) or installed)
    monkeypatch.setenv(module.CPU_LORA_ENV, "left over")  # never passed on as it is
    servers = manager(vllm_cpu_lora_ops=setting, vllm_cpu_scheduling="normal")
    servers.cpu = cpu
    assert servers.lora_ops() == ops
    env = servers.environment()
    assert env.get(module.CPU_LORA_ENV) == ("grouped" if ops == "grouped" else None)
    servers.environment()
    assert len(asked) == (1 if setting == "grouped" and cpu else 0)  # asked once at most
    missing = "computes LoRA with its own CPU ops" in caplog.text
    assert missing == (setting == "grouped" and cpu and not installed)


@pytest.mark.parametrize(("setting", "installed", "cpu", "scheduling"), [
    ("idle", True, True, "idle"), ("idle", False, True, "normal"),
    ("normal", True, True, "normal"), ("idle", True, False, None)])
def test_cpu_servers_run_the_model_at_idle_priority_where_the_plugin_is_installed(
        manager: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        setting: str, installed: bool, cpu: bool, scheduling: str | None) -> None:
    from engine.vllm import servers as module

    asked: list[str | None] = []
    monkeypatch.setattr(module, "plugin_installed",
                        lambda python: asked.append(python) or installed)
    monkeypatch.setenv(module.CPU_SCHEDULING_ENV, "idle")  # left over: never passed on
    servers = manager(vllm_cpu_scheduling=setting, vllm_cpu_lora_ops="vllm")
    servers.cpu = cpu
    assert servers.cpu_scheduling() == scheduling
    env = servers.environment()
    assert env.get(module.CPU_SCHEDULING_ENV) == ("idle" if scheduling == "idle" else None)
    assert len(asked) == (1 if setting == "idle" and cpu else 0)
    missing = "runs the model at the API's CPU priority" in caplog.text
    assert missing == (setting == "idle" and cpu and not installed)


def test_a_started_server_says_how_it_runs_on_the_cpu(manager: Any, tiny_model: Path) -> None:
    servers = manager()  # the stand-in vLLM has no plugin
    server = run(servers.get(text_of(tiny_model)))
    assert server.stats()["lora_ops"] == "vllm"
    assert server.lora_ops == servers.lora_ops() == "vllm"
    assert server.stats()["cpu_scheduling"] == server.cpu_scheduling == "normal"


@pytest.mark.parametrize(("settings", "cpu", "asked", "rank"), [
    ({}, True, 0, "8"), ({}, True, 16, "16"), ({}, True, 40, "64"), ({}, True, 128, "8"),
    ({}, False, 8, "64"), ({"vllm_max_lora_rank": 128}, False, 0, "128"),
    ({"vllm_max_lora_rank": 8}, True, 16, "8"),
    ({"vllm_max_lora_rank": 32, "vllm_adaptive_lora_rank": False}, True, 8, "32"),
    ({"vllm_adaptive_lora_rank": True}, False, 16, "16")])
def test_the_max_lora_rank_follows_the_adapters_asked_for_on_the_cpu(
    manager: Any, tiny_model: Path, settings: dict[str, Any], cpu: bool, asked: int, rank: str,
) -> None:
    """vLLM's CPU LoRA kernels cost time in proportion to --max-lora-rank: a CPU server starts
    at the smallest of vLLM's ranks that covers the adapters asked of its base model (at least
    8, at most LORAFLEET_VLLM_MAX_LORA_RANK, which refuses higher ones); a GPU one at 64."""
    servers = manager(**settings)
    servers.cpu = cpu
    servers.ask(str(tiny_model), asked)
    argv = servers.command(text_of(tiny_model), 1234)
    assert argv[argv.index("--max-lora-rank") + 1] == rank
    assert servers.rank_of(str(tiny_model)) == int(rank)


def test_a_larger_adapter_restarts_the_server_at_a_higher_rank_after_its_requests(
    manager: Any, tiny_model: Path,
) -> None:
    servers = manager()
    text = text_of(tiny_model)

    async def scenario() -> None:
        first = await servers.get(text, 8)
        assert first.max_lora_rank == 8
        assert await servers.get(text, 4) is first and await servers.get(text) is first
        release = first.admit(10)  # a request in flight on it
        second = await servers.get(text, 16)
        assert second is not first and second.max_lora_rank == 16
        assert second.process is not None and "--max-lora-rank 16" in " ".join(
            map(str, second.process.args))
        assert await servers.get(text, 8) is second  # new requests go to the new server
        assert [s for s in servers] == [second]
        await asyncio.sleep(0.5)
        assert not first.exited()  # its request is not done
        release()
        deadline = time.monotonic() + 30
        while not first.exited():
            assert time.monotonic() < deadline, "the replaced server was not stopped"
            await asyncio.sleep(0.05)
        assert not second.exited()
        # Stopped when idle, the base model's next server starts at the rank it needs.
        await servers.stop(second)
        third = await servers.get(text, 8)
        assert third.max_lora_rank == 16

    run(scenario())
    assert servers.starts == 3 and servers.rank_restarts == 1


def test_requests_the_old_server_can_serve_go_on_while_the_wider_one_starts(
    manager: Any, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ready = tmp_path / "rank-32-may-start"
    monkeypatch.setenv("FAKE_VLLM_HOLD_RANK", f"32:{ready}")
    servers = manager()
    text = text_of(tiny_model)

    async def scenario() -> None:
        first = await servers.get(text, 8)
        widening = asyncio.ensure_future(servers.get(text, 32))
        while servers.starts < 2:  # the rank-32 server is launched and waits for the file
            await asyncio.sleep(0.05)
        assert await servers.get(text, 8) is first  # not held up by the start
        assert not widening.done()
        release = first.admit(10)
        ready.touch()
        second = await widening
        assert second.max_lora_rank == 32 and [s for s in servers] == [second]
        await asyncio.sleep(0.5)
        assert not first.exited()  # draining its request
        await servers.stop_all()  # a server still draining is stopped too
        release()
        assert first.exited() and second.exited()

    run(scenario())


@pytest.mark.parametrize(("cpu", "dtype", "eager"), [(True, "float32", True),
                                                     (False, "auto", False)])
def test_a_gpu_server_keeps_cuda_graphs_and_its_dtype(
    manager: Any, tiny_model: Path, cpu: bool, dtype: str, eager: bool,
) -> None:
    """On a GPU, vLLM decodes with CUDA graphs (no --enforce-eager) in the model's dtype; on the
    CPU it runs eager in float32, as peft does there."""
    servers = manager()
    servers.cpu = cpu
    argv = servers.command(text_of(tiny_model), 1234)
    assert argv[argv.index("--dtype") + 1] == dtype
    assert ("--enforce-eager" in argv) is eager
    assert ("--gpu-memory-utilization" in argv) is not eager  # only a GPU has that memory


@pytest.mark.parametrize(("settings", "share"), [
    ({}, "0.45"), ({"vllm_max_servers": 3}, "0.3"), ({"vllm_max_servers": 1}, "0.9"),
    ({"vllm_gpu_memory_utilization": 0.6}, "0.6"),
    ({"vllm_gpu_memory_utilization": 0.6, "vllm_max_servers": 4}, "0.6")])
def test_gpu_servers_share_the_gpu_memory_that_vllm_takes_up_front(
    manager: Any, tiny_model: Path, settings: dict[str, Any], share: str,
) -> None:
    """Each vLLM server reserves its --gpu-memory-utilization of the GPU when it starts: unset,
    the servers that may run at once (LORAFLEET_VLLM_MAX_SERVERS) split vLLM's 0.9, so the
    second one fits beside the first."""
    servers = manager(**settings)
    servers.cpu = False
    argv = servers.command(text_of(tiny_model), 1234)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == share
    n = servers.settings.vllm_max_servers
    if "vllm_gpu_memory_utilization" not in settings:
        assert n * float(share) <= 0.9 + 1e-9


def test_the_gpu_memory_setting_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        Settings(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        Settings(vllm_gpu_memory_utilization=0)


def test_servers_start_on_demand_and_the_least_recently_used_idle_one_makes_room(
    manager: Any, tiny_model: Path, other_model: Path,
) -> None:
    servers = manager(vllm_max_servers=1)

    async def scenario() -> None:
        first = await servers.get(text_of(tiny_model))
        assert await servers.get(text_of(tiny_model)) is first  # started once
        assert (await servers.client.get(f"{first.url}/health")).status_code == 200
        assert first.served_name == str(tiny_model) and first.started_seconds is not None
        release = first.admit(10)
        with pytest.raises(Overloaded):  # the only slot is busy with another base model
            await servers.get(text_of(other_model))
        release()
        second = await servers.get(text_of(other_model))
        assert first.exited() and not second.exited()
        assert [s.base_model for s in servers] == [str(other_model)]

    run(scenario())
    assert servers.starts == 2


def test_an_idle_server_is_stopped(manager: Any, tiny_model: Path) -> None:
    servers = manager(vllm_idle_seconds=300)

    async def scenario() -> None:
        server = await servers.get(text_of(tiny_model))
        await servers.stop_idle()
        assert not server.exited()  # used just now
        server.last_used -= 301
        release = server.admit(10)
        await servers.stop_idle()
        assert not server.exited()  # a request is in flight
        release()
        server.last_used -= 301
        await servers.stop_idle()
        assert server.exited() and list(servers) == []

    run(scenario())


def test_a_server_that_died_is_reported_once_then_replaced(manager: Any,
                                                            tiny_model: Path) -> None:
    servers = manager()

    async def scenario() -> None:
        server = await servers.get(text_of(tiny_model))
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)
        while server.process.poll() is None:
            await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable) as died:
            await servers.get(text_of(tiny_model))
        assert died.value.status == 503
        assert str(server.log_path) in died.value.message
        assert "exited with code -9" in died.value.message
        again = await servers.get(text_of(tiny_model))
        assert again is not server and not again.exited()
        # A death that a request in flight reported already is not reported again.
        assert again.process is not None
        os.killpg(again.process.pid, signal.SIGKILL)
        while again.process.poll() is None:
            await asyncio.sleep(0.05)
        assert again.death().status == 503  # what the request in flight answered
        third = await servers.get(text_of(tiny_model))
        assert third is not again and not third.exited()

    run(scenario())


def test_a_server_that_does_not_start_says_why_and_where_its_log_is(
    manager: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    servers = manager()
    with pytest.raises(ServiceUnavailable) as failed:
        run(servers.get(text_of(tiny_model)))
    message = failed.value.message
    assert "exited with code 3 while starting" in message
    assert "Unsupported CPU attention configuration: head_dim=16" in message
    log = Path(message.rsplit("its log: ", 1)[1])
    assert log.is_file() and "fake vLLM" in log.read_text()


def test_a_server_that_never_answers_is_given_up(manager: Any, tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_SILENT", "1")
    servers = manager(vllm_startup_seconds=1)
    with pytest.raises(ServiceUnavailable) as failed:
        run(servers.get(text_of(tiny_model)))
    assert "LORAFLEET_VLLM_STARTUP_SECONDS" in failed.value.message
    assert list(servers) == []


def test_an_external_server_is_used_as_it_is(manager: Any, fake_python: str,
                                             tiny_model: Path, tmp_path: Path) -> None:
    import subprocess

    from tests.support.stack import free_port

    port = free_port()
    process = subprocess.Popen([fake_python, "-m", "x", "--port", str(port),
                                "--served-model-name", "served-base"])
    try:
        servers = manager(vllm_servers={str(tiny_model): f"http://127.0.0.1:{port}/"})

        async def scenario() -> Any:
            deadline = time.monotonic() + 60
            while True:
                try:
                    return await servers.get(text_of(tiny_model))
                except ServiceUnavailable:
                    assert time.monotonic() < deadline, "the stand-in did not start"
                    await asyncio.sleep(0.1)

        server = run(scenario())
        assert server.url == f"http://127.0.0.1:{port}" and not server.managed
        assert server.served_name == "served-base" and servers.starts == 0
    finally:
        process.kill()
        process.wait()


def test_auto_falls_back_to_the_built_in_engine_without_vllm(
    settings_env: Callable[..., Any], tmp_path: Path,
) -> None:
    from engine.app import Engine, build_engine
    from engine.vllm.gateway import VllmEngine
    from engine.vllm.servers import find_vllm_python

    # The test's own Python has no vllm package.
    settings = settings_env(vllm_python=sys.executable)
    python, why = find_vllm_python(settings)
    assert python is None and "has no vllm package" in why
    assert isinstance(build_engine(settings), Engine)
    settings = settings_env(vllm_python=str(tmp_path / "none"))
    assert "no vLLM Python" in find_vllm_python(settings)[1]
    assert isinstance(build_engine(settings), Engine)
    with pytest.raises(RuntimeError, match="LORAFLEET_ENGINE_BACKEND=vllm"):
        build_engine(settings_env(vllm_python=sys.executable, engine_backend="vllm"))
    # Servers named in the settings are enough for vLLM.
    servers = settings_env(vllm_python=sys.executable,
                               vllm_servers='{"/models/m": "http://10.0.0.1:8000"}')
    assert isinstance(build_engine(servers), VllmEngine)
    assert isinstance(build_engine(settings_env(engine_backend="builtin")), Engine)


def test_the_vllm_environment_is_found_beside_the_project_from_any_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from engine.vllm.servers import find_vllm_python, vllm_python_candidates
    from tests.support.processes import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    project_env = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    assert vllm_python_candidates(Settings())[0][0] == project_env
    python, why = find_vllm_python(Settings())
    if project_env.is_file():
        assert python == str(project_env) and "the project's folder" in why
    else:
        assert python is None and str(project_env) in why
    # A configured one is the only one looked at.
    assert vllm_python_candidates(Settings(vllm_python="/opt/x/python")) == [
        (Path("/opt/x/python"), "LORAFLEET_VLLM_PYTHON")]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python").is_file()
                    and not os.environ.get("CI"), reason="no .venv-vllm (`make venv-vllm`)")
def test_serve_started_in_another_folder_serves_with_vllm_and_says_why(
    started_app: Callable[..., Any], tmp_path: Path,
) -> None:
    """`lorafleet serve` started outside the project's folder still finds `make venv-vllm`'s
    environment; its /health and the API's /health say which engine serves (the console
    shows the API's: tests/console)."""
    from bench.serving_latency import stop_engine
    from tests.support.processes import free_port, service_env

    port = free_port()
    log_path = tmp_path / "engine.log"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = service_env({"LORAFLEET_STORAGE_DIR": str(tmp_path / "storage"),
                       "LORAFLEET_ENGINE_PORT": str(port)})
    lorafleet = str(Path(sys.executable).parent / "lorafleet")
    with log_path.open("wb") as log:
        engine = subprocess.Popen([lorafleet, "serve"], cwd=elsewhere, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        health = None
        deadline = time.monotonic() + 120
        while health is None and time.monotonic() < deadline and engine.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, log_path.read_text(errors="replace")
        assert health["backend"] == "vllm", health
        assert ".venv-vllm" in health["backend_reason"]
        assert "generating with vLLM" in log_path.read_text(errors="replace")
        api = started_app(engine_url=f"http://127.0.0.1:{port}")
        engine_health = api.get("/health").json()["engine"]
        assert engine_health["status"] == "ok" and engine_health["backend"] == "vllm"
        assert engine_health["reason"] == health["backend_reason"]
    finally:
        stop_engine(engine)
    # Without an engine the API still answers, and says so.
    assert api.get("/health").json()["engine"]["status"] == "unavailable"
