"""The web console's files: HTML, CSS and JavaScript modules shipped in ``static/``, read once.

The page and its modules are plain files (no build step, nothing fetched from elsewhere). Assets
are served under a version made of their contents' hash, so a browser may keep them for good and
still gets new ones when the package changes: the page, which names the version, is revalidated
on every load.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
VERSION_MARK = "{{version}}"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml", ".txt": "text/plain"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@dataclass(frozen=True)
class ConsoleFiles:
    """The page (with the asset version filled in) and the assets by their relative path."""

    version: str
    page: Asset
    assets: dict[str, Asset]


def _asset(body: bytes, name: str) -> Asset:
    suffix = Path(name).suffix
    media = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media.startswith("text/") or media.endswith("+xml"):
        media += "; charset=utf-8"
    return Asset(body, media, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


@cache
def console_files() -> ConsoleFiles:
    """Read ``static/`` once: every file but the page is an asset."""
    files = {p.relative_to(STATIC_DIR).as_posix(): p.read_bytes()
             for p in sorted(STATIC_DIR.rglob("*")) if p.is_file()}
    digest = hashlib.sha256()
    for name, body in files.items():
        digest.update(name.encode() + b"\0" + body + b"\0")
    version = digest.hexdigest()[:16]
    page = files.pop(PAGE).replace(VERSION_MARK.encode(), version.encode())
    return ConsoleFiles(version, _asset(page, PAGE),
                        {name: _asset(body, name) for name, body in files.items()})
