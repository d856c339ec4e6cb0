"""``GET /``: the upload page (plain HTML, CSS and JavaScript under ``static/``), served by the API itself.

No framework and no CDN: the page works offline and inside the cluster, and it only ever calls ``/predict``.
The few assets are read once (on first request) and served with explicit routes (a router cannot mount ``StaticFiles``),
each with its content type, an ETag and strict security headers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from services.api.errors import ApiError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",  # data: for the activation map's small PNG in /predict?explain=true
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class Asset(NamedTuple):
    body: bytes
    media_type: str
    etag: str


class PageNotInstalled(ApiError):
    status_code = 503
    error_code = "PAGE_NOT_INSTALLED"


@functools.cache
def load(name: str) -> Asset:
    """Read once, on first request: a build without the files must not stop the API from serving ``/predict``."""
    try:
        body = (STATIC_DIR / name).read_bytes()
    except FileNotFoundError:
        log.error("the upload page's %s is not installed under %s (package data missing?)", name, STATIC_DIR)
        raise PageNotInstalled(f"the upload page is not installed in this build ({name} is missing)") from None
    return Asset(body, CONTENT_TYPES[Path(name).suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')


ASSETS = frozenset({"app.js", "style.css", "favicon.svg"})

router = APIRouter(include_in_schema=False)


def _serve(request: Request, asset: Asset, response_class: type[Response] = Response) -> Response:
    # Revalidated on every load (cheap with the ETag), so a new release is never hidden behind a stale cache.
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return response_class(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> Response:
    return _serve(request, load("index.html"), HTMLResponse)


@router.get("/static/{name}")
async def static_asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no static asset named {name!r}")
    return _serve(request, load(name))
