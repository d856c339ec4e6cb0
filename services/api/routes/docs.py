"""``/docs`` (Swagger UI) and ``/redoc``, served from the ``fastapi-offline`` package's copies of their assets.

FastAPI's own pages load floating versions from a CDN: blank without internet, and third-party code on the
origin that takes ``POST /feedback``. These pages load nothing from elsewhere, carry no inline script, and
get security headers like the upload page's (their CSP allows inline *styles*, which both UIs set).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from services.api.routes.page import SECURITY_HEADERS

DOCS_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src blob:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"}

SWAGGER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dandelion or grass: API</title>
<link rel="icon" href="/static/favicon.svg"><link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script><script src="/docs/assets/init.js"></script></body></html>
"""
REDOC = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dandelion or grass: API</title>
<link rel="icon" href="/static/favicon.svg"></head>
<body><redoc spec-url="/openapi.json"></redoc><script src="/docs/assets/redoc.standalone.js"></script></body></html>
"""
INIT = b"""window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
"""
ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "init.js": "text/javascript; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@functools.cache
def _asset(name: str) -> tuple[bytes, str]:
    body = INIT if name == "init.js" else resources.files("fastapi_offline").joinpath("static", name).read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


@router.get("/docs", response_class=HTMLResponse)
async def swagger() -> HTMLResponse:
    return HTMLResponse(SWAGGER, headers=HEADERS)


@router.get("/redoc", response_class=HTMLResponse)
async def redoc() -> HTMLResponse:
    return HTMLResponse(REDOC, headers=HEADERS)


@router.get("/docs/assets/{name}")
async def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail="no such documentation asset")
    body, etag = _asset(name)
    headers = {**HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=ASSETS[name], headers=headers)
