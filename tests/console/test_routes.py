"""The console's routes: the page and its assets, their headers, and what the files may not
hold (inline scripts, anything fetched from elsewhere)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from api.console import STATIC_DIR, console_files
from api.routes.console import ASSET_CACHE, CONTENT_SECURITY_POLICY, PAGE_CACHE


@pytest.fixture
def app(started_app: Callable[..., Any]) -> Any:
    return started_app()


def test_root_redirects_to_the_console(app: Any) -> None:
    answer = app.get("/", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "/console"


def test_the_page_has_a_content_security_policy_and_is_revalidated(app: Any) -> None:
    page = app.get("/console")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == PAGE_CACHE
    assert page.headers["x-content-type-options"] == "nosniff"
    # Unchanged: a 304 without a body.
    again = app.get("/console", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""


def test_assets_are_versioned_and_cached_for_good(app: Any) -> None:
    files = console_files()
    html = app.get("/console").text
    urls = re.findall(r'(?:src|href)="(/console/assets/[^"]+)"', html)
    assert len(urls) == 2  # the style sheet and the entry module
    for url in urls:
        assert f"/console/assets/{files.version}/" in url
        answer = app.get(url)
        assert answer.status_code == 200, url
        assert answer.headers["cache-control"] == ASSET_CACHE
    module = app.get(f"/console/assets/{files.version}/js/app.js")
    assert module.headers["content-type"].startswith("text/javascript")
    # A page from before an upgrade gets today's file, revalidated rather than kept.
    stale = app.get("/console/assets/0123456789abcdef/js/app.js")
    assert stale.status_code == 200
    assert stale.headers["cache-control"] == PAGE_CACHE


def test_unknown_assets_are_404_in_the_api_error_shape(app: Any) -> None:
    version = console_files().version
    for name in ("nope.js", "../__init__.py", "..%2F__init__.py", "index.html"):
        answer = app.get(f"/console/assets/{version}/{name}")
        assert answer.status_code == 404, name
        assert answer.json()["error"]["code"] == "not_found"


def test_the_console_is_not_in_the_openapi_schema(app: Any) -> None:
    paths = app.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]


def test_the_files_run_no_inline_script_and_fetch_nothing_from_elsewhere() -> None:
    page = (STATIC_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all('src="' in s for s in scripts), scripts
    assert not re.search(r"\son[a-z]+=", page), "inline event handlers are blocked by the CSP"
    for path in STATIC_DIR.rglob("*"):
        if path.suffix not in {".js", ".css", ".html"}:
            continue
        text = path.read_text()
        # The only absolute URL allowed is SVG's namespace, which is a name, not a request.
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{path.name} names {urls}"
        assert "innerHTML" not in text and "eval(" not in text, path.name
        if path.suffix == ".js":
            # The key goes in a header only: never in a URL, never in local storage.
            assert "localStorage" not in text, path.name


def test_every_console_file_ships_in_the_package() -> None:
    """pyproject.toml's package data names every file of ``static/`` (else an installed API
    would serve a page whose modules are missing)."""
    import tomllib
    from fnmatch import fnmatch

    from tests.support.stack import REPO_ROOT

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["api.console"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            name = path.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch(name, g) and name.count("/") == g.count("/") for g in globs), name
