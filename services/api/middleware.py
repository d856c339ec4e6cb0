"""ASGI guards in front of every route: request size, header size and count, and how long a body may take.

They answer before anything buffers what they refuse, and their answers are the API's usual
``{"error_code", "message"}`` JSON. What they cannot do (a slow client that never finishes its headers
is uvicorn's, before any ASGI code runs) is the ingress's job: see the README's security section.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import ApiError, PayloadTooLarge, RequestTimeout
from services.api.responses import JSONResponse


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status, headers=headers)


def human_bytes(n: int) -> str:
    """``67108864`` -> ``64 MiB``: limits as people write them."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


class BodyLimitMiddleware:
    """Refuses bodies over their route's limit (declared, or as they stream in) with 413, and bodies that take
    longer than ``read_timeout_s`` to arrive with 408.

    A body cut off mid-stream surfaces inside the route as an error the route may render as it likes (FastAPI
    calls a body it could not read a 400); whatever the route answers then, the client gets the 413 or 408.
    """

    def __init__(
        self, app: ASGIApp, limit: int, per_path: dict[str, int] | None = None, read_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.limit = limit
        self.per_path = per_path or {}
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.limit)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send(send, _too_large(limit))
                return
        received = 0
        refusal: JSONResponse | None = None
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, refusal, body_done
            if body_done:  # the body is in: what follows (a hang-up) has no deadline
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except TimeoutError:
                error = RequestTimeout(f"the request body did not arrive within {self.read_timeout_s:g} s")
                refusal = JSONResponse(error.body(), status_code=error.status_code)
                raise error from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = _too_large(limit)
                    raise PayloadTooLarge(f"the request body is over the limit of {human_bytes(limit)}")
                body_done = not message.get("more_body", False)
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:  # the route answered a body it could not read: the client gets why
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send(send, refusal)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ApiError:
            if not started and refusal is not None:
                await _send(send, refusal)
            elif refusal is None:
                raise


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, "PAYLOAD_TOO_LARGE", f"the request body is over the limit of {human_bytes(limit)}")


async def _send(send: Send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class HeaderLimitMiddleware:
    """431 for requests with more than ``max_count`` headers or more than ``max_bytes`` of them in all."""

    def __init__(self, app: ASGIApp, max_count: int = 100, max_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.max_count = max_count
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            size = sum(len(name) + len(value) + 4 for name, value in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                message = (
                    f"the request has {len(headers)} headers ({human_bytes(size)}); the limits are "
                    f"{self.max_count} headers and {human_bytes(self.max_bytes)}"
                )
                await _send(send, error_response(431, "REQUEST_HEADER_FIELDS_TOO_LARGE", message))
                return
        await self.app(scope, receive, send)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""Methods metered under their own name; any other (PROPFIND, MKCOL, QUERY, ...) is metered as ``other``."""
ORIGINAL_METHOD = "dandelion.original_method"


class MeterMethodAsOther:
    """Outside the metrics middleware: an unknown method is seen there as ``other``, so a client cannot add
    series by inventing method names. :class:`RestoreMethod`, inside it, gives the routes the real one back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in KNOWN_METHODS:
            scope = {**scope, "method": "other", ORIGINAL_METHOD: scope["method"]}
        await self.app(scope, receive, send)


class RestoreMethod:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if ORIGINAL_METHOD in scope:
            scope = {**scope, "method": scope[ORIGINAL_METHOD]}
        await self.app(scope, receive, send)


class RequestFramingMiddleware:
    """400 for a request without exactly one ``Host`` header (HTTP/1.1 asks for one, RFC 9112 section 3.2), and
    415 for a body with any ``Content-Encoding`` but ``identity``: no compressed body is accepted, and a plain
    body labelled as gzip must not be read as if the label were true."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            hosts = sum(1 for name, _ in headers if name == b"host")
            if hosts > 1 or (hosts == 0 and scope.get("http_version") != "1.0"):
                message = f"the request has {hosts} Host headers; HTTP/1.1 asks for exactly one"
                await _send(send, error_response(400, "BAD_REQUEST", message))
                return
            for name, value in headers:
                if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                    shown = value.decode("latin-1")[:30]
                    message = f"Content-Encoding {shown!r} is not supported: send the body uncompressed"
                    await _send(send, error_response(415, "UNSUPPORTED_MEDIA_TYPE", message))
                    return
        await self.app(scope, receive, send)


class HeadMiddleware:
    """``HEAD`` on any ``GET`` route: the route runs as ``GET`` and the body is dropped (headers, including the
    length, kept), as HTTP asks. FastAPI's routes answer only the methods they name, so without this a
    probe's or a cache's ``HEAD /`` got 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ConcurrencyLimitMiddleware:
    """503 (with ``Retry-After``) for a request beyond ``limit`` requests in progress, except on the ``exempt``
    paths (probes and ``/metrics``), which are always answered: a busy replica is still alive, and says so.

    This replaces uvicorn's own ``limit_concurrency``, which counted open connections too, idle ones included,
    and refused probes like any other request once they were used up.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            message = f"the server is handling {self.limit} requests, its limit; try again shortly"
            await _send(send, error_response(503, "TEMPORARILY_UNAVAILABLE", message, headers={"Retry-After": "1"}))
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
