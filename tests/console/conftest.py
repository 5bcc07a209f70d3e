"""Browser tests of the console: headless Chromium (the system's ``chromium``, driven by
Playwright) against a live stack of API, worker and inference engine processes.

Playwright's own browser download cannot be used here: the tests launch the Chromium that the
system package installs (``.ci/run`` installs it when it is missing). Without it they skip on a
developer's machine and fail under CI, so they never pass there unrun.

Screenshots go to ``.artifacts/console/`` (git-ignored), kept after the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import serving  # noqa: F401  (the stack with an engine)
from tests.support.stack import REPO_ROOT

ARTIFACTS = REPO_ROOT / ".artifacts" / "console"
# The worker started with this environment holds the checkpoint save of step N while
# ``<gate>/hold-N`` exists (tests/resilience/slow_save/sitecustomize.py): a test watches a job
# mid-training as long as it needs, however fast the machine trains.
SAVE_GATE_SITE = REPO_ROOT / "tests" / "resilience" / "slow_save"


def chromium_path() -> str | None:
    """The system's Chromium: ``LORAFLEET_TEST_CHROMIUM``, else ``chromium`` on the PATH."""
    named = os.environ.get("LORAFLEET_TEST_CHROMIUM")
    if named:
        return named
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for the module (its own Playwright driver, stopped after it)."""
    path = chromium_path()
    if path is None:
        message = ("Chromium is not installed: `apt-get install -y chromium` (or set "
                   "LORAFLEET_TEST_CHROMIUM to a Chromium binary)")
        if os.environ.get("CI"):
            pytest.fail(f"{message}; the console's browser tests must run in CI")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Console:
    """One browser tab on the console of a stack, with the steps a person takes."""

    def __init__(self, page: Any, base_url: str, name: str):
        self.page = page
        self.base_url = base_url
        self.name = name
        self.console_errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())  # "Cancel this job?"

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base_url}/{fragment}")
        # Up to 5000 requests are kept for the polling checks (the default is 250).
        self.page.evaluate("performance.setResourceTimingBufferSize(5000)")

    def sign_in(self, key: str) -> None:
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()

    def text(self, selector: str) -> str:
        return str(self.page.locator(selector).inner_text())

    def points(self, series: str = "train") -> int:
        """How many points the loss chart draws for ``series`` (0 before it has any)."""
        path = self.page.locator(f'#loss-chart path[data-series="{series}"]')
        return int(path.get_attribute("data-points") or 0) if path.count() else 0

    def request_starts(self, pattern: str) -> list[float]:
        """When (ms, the page's clock) the page started each request whose URL matches the
        regular expression ``pattern``, oldest first, as the browser timed them."""
        entries = self.page.evaluate(
            "() => performance.getEntriesByType('resource')"
            ".map(e => [e.name, e.startTime, e.initiatorType])")
        return sorted(start for url, start, kind in entries
                      if kind == "fetch" and re.search(pattern, url))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_no_trace_shown(self) -> None:
        """No stack trace on the page, and no "something went wrong" notice either."""
        body = str(self.page.locator("body").inner_text())
        for mark in ("Traceback", "    at ", "TypeError", "ReferenceError", "SyntaxError"):
            assert mark not in body, f"the page shows {mark!r}:\n{body}"
        notice = self.page.locator("#notice")
        assert notice.is_hidden(), f"the page shows a notice: {notice.inner_text()}"


@pytest.fixture
def console(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``console(base_url, width=1280, height=900)``: a new tab with a fresh session (nothing
    signed in); a failing test leaves its screenshot in the artifacts."""
    contexts: list[Any] = []
    tabs: list[Console] = []
    name = re.sub(r"\W+", "-", request.node.name).strip("-")

    def open_tab(base_url: str, width: int = 1280, height: int = 900) -> Console:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        tab = Console(context.new_page(), base_url, f"{name}-{len(tabs)}")
        tabs.append(tab)
        return tab

    yield open_tab
    failed = getattr(request.node, "rep_call", None)
    for tab in tabs:
        if failed is not None and failed.failed:
            with contextlib.suppress(Exception):  # the browser may be gone
                tab.screenshot("failure")
    for context in contexts:
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
