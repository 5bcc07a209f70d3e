"""The web console: ``/console`` and its assets, for people who would rather look than read
JSON. The pages call the public ``/v1`` API from the browser with the key the person signs in
with, so they show exactly what that key's project may see; these routes need no key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from api.console import Asset, console_files
from shared.errors import NotFound

router = APIRouter(include_in_schema=False)

# Scripts, styles and requests only from this origin: no inline script can run, so markup that
# slipped into a job's name or an event's message stays text.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The page names the assets' version: revalidated on every load (a 304 when unchanged).
PAGE_CACHE = "no-cache"
# An asset's URL carries the hash of every asset, so its content never changes.
ASSET_CACHE = "public, max-age=31536000, immutable"


def _send(request: Request, asset: Asset, cache_control: str) -> Response:
    headers = {**_COMMON_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
def root() -> RedirectResponse:
    """The console is the API's front page."""
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
def console_page(request: Request) -> Response:
    """The console's single page; it routes on the URL's fragment (``#/jobs/…``)."""
    return _send(request, console_files().page, PAGE_CACHE)


@router.get("/console/assets/{version}/{name:path}")
def console_asset(version: str, name: str, request: Request) -> Response:
    """A CSS, JavaScript or licence file of the console."""
    files = console_files()
    asset = files.assets.get(name)
    if asset is None:
        raise NotFound(f"No such console file: {name}")
    # A page from before an upgrade still gets today's file, just not for keeps.
    return _send(request, asset, ASSET_CACHE if version == files.version else PAGE_CACHE)
