"""Fixtures shared by every test: a tiny model, live stacks of real processes, settings.

Stacks (``tests.support.stack.Stack``) are the API and Celery workers as subprocesses.
Starting a worker imports torch (seconds), so tests that don't interfere share one stack per
module (``stack``); tests that change settings or kill processes take their own
(``make_stack``). While a stack runs, a failing test's report carries the stack's logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.seaweedfs import AWS_ENV, s3_bucket, seaweedfs  # noqa: F401 - fixtures

# The test S3 server's credentials, through the standard AWS variables: every store this
# process or a service it starts makes reads them (never real AWS credentials in tests).
os.environ.update(AWS_ENV)
from tests.support.stack import LIVE_STACKS, Stack, StackFactory


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Phi model with its own tokenizer (built offline, once per run)."""
    from worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path) -> Any:
    """The tiny model's tokenizer, loaded as the worker loads it."""
    from modelio.loading import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="session")
def shared_vllm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The tiny model's vLLM server that the serving stacks of the session share
    (:class:`tests.support.vllm.SharedVllm`), started on first use; stopped at the end."""
    from tests.support.vllm import SharedVllm

    server = SharedVllm(tiny_model, tmp_path_factory.mktemp("shared-vllm"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note the last module that starts a serving stack: ``shared_vllm`` stops after it."""
    from tests.support.vllm import LAST_SERVING_MODULE

    for item in reversed(items):
        module = item.getparent(pytest.Module)
        if module is not None and "serving" in getattr(item, "fixturenames", ()):
            config.stash[LAST_SERVING_MODULE] = module.nodeid
            break


# --------------------------------------------------------------------------- stacks
@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[StackFactory]:
    """Start stacks that live for one test: ``make_stack(workers=2, settings={...})``."""
    factory = StackFactory(tmp_path_factory, "stack", request)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_module_stack(tmp_path_factory: pytest.TempPathFactory,
                      request: pytest.FixtureRequest) -> Iterator[StackFactory]:
    """Start stacks shared by the tests of one module."""
    factory = StackFactory(tmp_path_factory, "stack", request)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def stack(make_module_stack: StackFactory) -> Stack:
    """The default stack of a module: embedded backend, one worker."""
    return make_module_stack()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    """An ``openai.OpenAI`` client on the module's stack."""
    return stack.openai()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for i, live in enumerate(LIVE_STACKS):
            report.sections.append((f"lorafleet stack {i} logs", live.logs_text()))
    return report


# --------------------------------------------------------------------------- in-process settings
@pytest.fixture
def settings_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., Any]]:
    """Point this process's ``get_settings()`` at a fresh storage folder, with overrides:
    ``settings = settings_env(max_upload_bytes=10)``. Caches are cleared before and after."""
    from api.auth import key_cache, key_checks
    from api.model_cache import model_cache
    from api.status_cache import status_cache
    from shared import db, queue
    from shared.settings import get_settings

    caches = (get_settings, db.get_engine, db.get_sessionmaker, queue.get_celery)

    def clear() -> None:
        if db.get_engine.cache_info().currsize:
            db.get_engine().dispose()
        for cached in caches:
            cached.cache_clear()
        key_cache.clear()
        key_checks.clear()
        status_cache.clear()  # reads in flight too: they belong to the old event loop
        model_cache.clear()

    def configure(**overrides: Any) -> Any:
        for name in [n for n in os.environ if n.startswith("LORAFLEET_")]:
            if not name.startswith(("LORAFLEET_TEST_", "LORAFLEET_DIALOGSUM_DIR")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("LORAFLEET_STORAGE_DIR", str(tmp_path / "storage"))
        monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "cache"))
        for name, value in overrides.items():
            monkeypatch.setenv(f"LORAFLEET_{name.upper()}", str(value))
        clear()
        return get_settings()

    clear()
    yield configure
    monkeypatch.undo()
    clear()


@pytest.fixture
def started_app(settings_env: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """``started_app(**settings)``: a started ``TestClient`` of the API (migrations run) under
    those settings; stopped at the end of the test."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    clients: list[TestClient] = []

    def start(**settings: Any) -> TestClient:
        settings_env(**settings)
        client = TestClient(create_app())
        client.__enter__()  # runs the start-up: migrations
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
