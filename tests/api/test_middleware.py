"""The ASGI guards one by one, driven by hand-made scopes: what each lets through, what it refuses, and with what.

The end-to-end view (a real uvicorn, real sockets, hostile clients) is in tests/reliability; here each guard's
boundaries are checked exactly, fast enough for mutation testing to run them for every planted bug.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from services.api.errors import BadRequest, PayloadTooLarge
from services.api.middleware import (
    KNOWN_METHODS,
    ORIGINAL_METHOD,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    HeaderLimitMiddleware,
    HeadMiddleware,
    MeterMethodAsOther,
    RequestFramingMiddleware,
    RestoreMethod,
    error_response,
    human_bytes,
)


def http(path: str = "/predict", method: str = "POST", headers=(), version: str = "1.1") -> dict:
    return {"type": "http", "path": path, "method": method, "http_version": version, "headers": list(headers)}


def body_messages(*chunks: bytes) -> list[dict]:
    return [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]


class Route:
    """An app that reads the whole body, remembers what it saw, and answers 200 (or what ``answer`` says)."""

    def __init__(self, answer=None) -> None:
        self.scopes: list[dict] = []
        self.bodies: list[bytes] = []
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope)
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if self.answer is not None:
            await self.answer(send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, scope: dict, messages: list[dict] | None = None) -> list[dict]:
    """Run ``app`` on ``scope`` with ``messages`` as the client's; what it sent back."""
    pending = list(messages if messages is not None else body_messages(b""))
    sent: list[dict] = []

    async def receive() -> dict:
        if pending and pending[0]["type"] == "test.pause":  # the client takes its time
            await asyncio.sleep(pending.pop(0)["seconds"])
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def status(sent: list[dict]) -> int:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return starts[0]["status"]


def answer(sent: list[dict]) -> dict:
    return json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def header(sent: list[dict], name: bytes) -> bytes | None:
    start = next(m for m in sent if m["type"] == "http.response.start")
    return dict(start["headers"]).get(name)


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        ((1 << 20) - 1, "1024.0 KiB"),
        (1 << 20, "1 MiB"),
        (67108864, "64 MiB"),
        ((1 << 30) + (1 << 29), "1.5 GiB"),
        (3 << 30, "3 GiB"),
    ],
)
def test_human_bytes(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


def test_error_response_is_the_api_error_shape() -> None:
    response = error_response(418, "TEAPOT", "short and stout", headers={"Retry-After": "1"})
    assert response.status_code == 418 and json.loads(response.body) == {
        "error_code": "TEAPOT",
        "message": "short and stout",
    }
    assert response.headers["retry-after"] == "1" and response.headers["content-type"] == "application/json"
    assert error_response(400, "X", "y").headers.get("retry-after") is None


async def test_a_declared_length_over_the_limit_is_refused_before_the_route_runs() -> None:
    route = Route()
    guard = BodyLimitMiddleware(route, limit=10, per_path={"/invocations": 20})
    sent = await call(guard, http(headers=[(b"content-length", b"11")]))
    assert status(sent) == 413 and route.scopes == []
    assert answer(sent) == {
        "error_code": "PAYLOAD_TOO_LARGE",
        "message": "the request body is over the limit of 10 bytes",
    }
    # At the limit, and under a path's own limit, the route runs; a length that is not a number is left to the
    # server (it is checked as the body streams in).
    assert status(await call(guard, http(headers=[(b"content-length", b"10")]), body_messages(b"x" * 10))) == 200
    assert status(await call(guard, http("/invocations", headers=[(b"content-length", b"20")]))) == 200
    assert status(await call(guard, http("/invocations", headers=[(b"content-length", b"21")]))) == 413
    assert status(await call(guard, http(headers=[(b"content-length", b"-1")]))) == 200
    assert len(route.scopes) == 3


async def test_a_body_streaming_past_the_limit_is_refused_whatever_the_route_answers() -> None:
    route = Route()
    guard = BodyLimitMiddleware(route, limit=10)
    assert status(await call(guard, http(), body_messages(b"x" * 4, b"y" * 6))) == 200
    assert route.bodies == [b"xxxxyyyyyy"]  # exactly at the limit: read whole
    sent = await call(guard, http(), body_messages(b"x" * 4, b"y" * 7))
    assert status(sent) == 413 and answer(sent)["error_code"] == "PAYLOAD_TOO_LARGE"

    async def renders_its_own_400(scope, receive, send) -> None:  # as FastAPI renders a body it could not read
        try:
            while (await receive()).get("more_body"):
                pass
        except PayloadTooLarge:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    sent = await call(BodyLimitMiddleware(renders_its_own_400, limit=10), http(), body_messages(b"x" * 11))
    assert status(sent) == 413 and answer(sent)["message"] == "the request body is over the limit of 10 bytes"
    assert len(sent) == 2  # the route's body is dropped: one answer only


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    route = Route()
    sent = await call(BodyLimitMiddleware(route, limit=10, read_timeout_s=0.05), http(), body_messages(b"x")[:0])
    assert status(sent) == 408
    assert answer(sent) == {
        "error_code": "REQUEST_TIMEOUT",
        "message": "the request body did not arrive within 0.05 s",
    }
    # A part in time and the rest never: still a 408.
    partial = [{"type": "http.request", "body": b"x", "more_body": True}]
    assert status(await call(BodyLimitMiddleware(Route(), 10, read_timeout_s=0.05), http(), partial)) == 408


async def test_once_the_body_is_in_waiting_for_the_client_has_no_deadline() -> None:
    seen: list[str] = []

    async def waits_for_a_hang_up(scope, receive, send) -> None:
        await receive()  # the whole body, in one message
        await asyncio.sleep(0.1)  # longer than the read timeout: the deadline has passed
        seen.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    hang_up = [{"type": "test.pause", "seconds": 0.2}, {"type": "http.disconnect"}]  # after the deadline
    for body in (body_messages(b"x"), [{"type": "http.request", "body": b"x"}]):  # more_body may be left out
        seen.clear()
        sent = await call(BodyLimitMiddleware(waits_for_a_hang_up, 10, read_timeout_s=0.05), http(), body + hang_up)
        assert status(sent) == 204 and seen == ["http.disconnect"]


async def test_the_route_s_own_errors_are_not_the_guard_s() -> None:
    async def refuses(scope, receive, send) -> None:
        await receive()
        raise BadRequest("not an image")

    with pytest.raises(BadRequest):
        await call(BodyLimitMiddleware(refuses, limit=10), http())

    async def refuses_after_answering(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()

    # The response has begun: the refusal cannot replace it, and the error ends the exchange quietly.
    sent = await call(BodyLimitMiddleware(refuses_after_answering, limit=1), http(), body_messages(b"xx"))
    assert status(sent) == 200


async def test_other_scopes_pass_every_guard_untouched() -> None:
    for make in (
        lambda app: BodyLimitMiddleware(app, limit=0),
        lambda app: HeaderLimitMiddleware(app, max_count=0, max_bytes=0),
        MeterMethodAsOther,
        RestoreMethod,
        RequestFramingMiddleware,
        HeadMiddleware,
        lambda app: ConcurrencyLimitMiddleware(app, limit=0),
    ):
        route = Route()
        scope = {"type": "lifespan", "method": "PROPFIND", "headers": [(b"content-length", b"9")]}
        assert await call(make(route), scope) == []
        assert route.scopes == [scope]


async def test_headers_over_the_count_or_the_size_are_a_431() -> None:
    route = Route()
    guard = HeaderLimitMiddleware(route, max_count=3, max_bytes=40)
    three = [(b"host", b"a"), (b"x-a", b"b"), (b"x-b", b"c")]  # 4+1+4 + 3+1+4 + 3+1+4 = 25 bytes
    assert status(await call(guard, http(headers=three))) == 200
    sent = await call(guard, http(headers=[*three, (b"x-c", b"d")]))
    assert status(sent) == 431 and route.scopes and len(route.scopes) == 1
    assert answer(sent) == {
        "error_code": "REQUEST_HEADER_FIELDS_TOO_LARGE",
        "message": "the request has 4 headers (33 bytes); the limits are 3 headers and 40 bytes",
    }
    exactly = [(b"host", b"a"), (b"x-long", b"b" * 21)]  # 4 + 1 + 4 and 6 + 21 + 4: 40 bytes
    assert status(await call(guard, http(headers=exactly))) == 200
    sent = await call(guard, http(headers=[(b"host", b"a"), (b"x-long", b"b" * 22)]))
    assert status(sent) == 431 and "2 headers (41 bytes)" in answer(sent)["message"]
    assert HeaderLimitMiddleware(route).max_count == 100 and HeaderLimitMiddleware(route).max_bytes == 16 * 1024


async def test_unknown_methods_are_metered_as_other_and_routed_as_themselves() -> None:
    assert frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}) == KNOWN_METHODS
    metered: list[str] = []
    route = Route()

    async def meter(scope, receive, send) -> None:  # where the metrics middleware sits
        metered.append(scope["method"])
        await RestoreMethod(route)(scope, receive, send)

    await call(MeterMethodAsOther(meter), http(method="PROPFIND"))
    for method in sorted(KNOWN_METHODS):
        await call(MeterMethodAsOther(meter), http(method=method))
    assert metered == ["other", *sorted(KNOWN_METHODS)]
    assert [s["method"] for s in route.scopes] == ["PROPFIND", *sorted(KNOWN_METHODS)]
    assert ORIGINAL_METHOD not in route.scopes[1]


async def test_exactly_one_host_header_unless_http_1_0() -> None:
    route = Route()
    guard = RequestFramingMiddleware(route)
    assert status(await call(guard, http(headers=[(b"host", b"a")]))) == 200
    assert status(await call(guard, http(headers=[], version="1.0"))) == 200
    for hosts in ([], [(b"host", b"a"), (b"host", b"b")]):
        sent = await call(guard, http(headers=hosts))
        assert status(sent) == 400
        assert answer(sent) == {
            "error_code": "BAD_REQUEST",
            "message": f"the request has {len(hosts)} Host headers; HTTP/1.1 asks for exactly one",
        }
    assert status(await call(guard, http(headers=[(b"host", b"a"), (b"host", b"b")], version="1.0"))) == 400
    assert len(route.scopes) == 2


async def test_only_an_identity_content_encoding_is_read() -> None:
    route = Route()
    guard = RequestFramingMiddleware(route)
    for value in (b"", b"identity", b" Identity "):
        headers = [(b"host", b"a"), (b"content-encoding", value)]
        assert status(await call(guard, http(headers=headers))) == 200, value
    sent = await call(guard, http(headers=[(b"host", b"a"), (b"content-encoding", b"gzip")]))
    assert status(sent) == 415
    assert answer(sent) == {
        "error_code": "UNSUPPORTED_MEDIA_TYPE",
        "message": "Content-Encoding 'gzip' is not supported: send the body uncompressed",
    }
    long = b"x" * 40 + "é".encode("latin-1")
    message = answer(await call(guard, http(headers=[(b"host", b"a"), (b"content-encoding", long)])))["message"]
    assert message.startswith(f"Content-Encoding {'x' * 30!r} ")
    assert len(route.scopes) == 3


async def test_head_runs_the_get_route_and_drops_the_body_only() -> None:
    route = Route()
    sent = await call(HeadMiddleware(route), http("/", method="HEAD"))
    assert route.scopes[0]["method"] == "GET"
    assert sent == [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
        {"type": "http.response.body", "body": b""},
    ]
    sent = await call(HeadMiddleware(route), http("/", method="GET"))
    assert sent[-1] == {"type": "http.response.body", "body": b"ok"}
    assert await call(HeadMiddleware(route), http("/", method="POST")) and route.scopes[-1]["method"] == "POST"


async def test_requests_beyond_the_limit_get_a_503_but_exempt_paths_are_answered() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(send) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = ConcurrencyLimitMiddleware(Route(slow), limit=1, exempt=frozenset({"/health/live"}))
    first = asyncio.create_task(call(guard, http()))
    await entered.wait()
    assert guard.in_progress == 1
    sent = await call(guard, http())
    assert status(sent) == 503 and header(sent, b"retry-after") == b"1"
    assert answer(sent) == {
        "error_code": "TEMPORARILY_UNAVAILABLE",
        "message": "the server is handling 1 requests, its limit; try again shortly",
    }
    probe = asyncio.create_task(call(guard, http("/health/live", method="GET")))
    release.set()
    assert status(await probe) == 200 and status(await first) == 200
    assert guard.in_progress == 0
    assert status(await call(guard, http())) == 200  # free again


async def test_a_failing_request_gives_its_place_back() -> None:
    async def fails(scope, receive, send) -> None:
        raise RuntimeError("boom")

    guard = ConcurrencyLimitMiddleware(fails, limit=2)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await call(guard, http())
    assert guard.in_progress == 0
