"""The hostile probe's findings, one regression test each (the app with the fake model, and the real process
where sockets, memory or uvicorn matter)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image
from pydantic import SecretStr

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.api.uploads import safe_filename
from tests.api.conftest import wait_ready
from tests.api.fakes import FakeSource
from tests.api.process import api_process
from tests.conftest import ARTIFACTS, api_env
from tests.servers import free_port, running, wait_until


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), (230, 200, 30), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


async def started(settings: ApiSettings, source: FakeSource | None = None):
    app = create_app(settings, source=source or FakeSource())
    # Start and stop are not what these tests judge: a loaded machine may take more than the default 5 s to
    # flush and close the prediction log's database.
    manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=60)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://api")
    await wait_ready(client)
    return app, manager, client


def series(metrics_text: str) -> int:
    return sum(1 for line in metrics_text.splitlines() if line.startswith("http_request"))


# ---------------------------------------------------------------- 2. metric series from random paths


async def test_random_paths_add_no_metric_series(client: httpx.AsyncClient) -> None:
    await client.get("/static/app.js")
    before = series((await client.get("/metrics")).text)
    for i in range(40):
        response = await client.get(f"/static/x{i}-{uuid.uuid4().hex[:6]}/")
        assert response.status_code == 404 and "location" not in response.headers
        await client.get(f"/no/such/{i}")
    assert series((await client.get("/metrics")).text) == before


# ---------------------------------------------------------------- 3. open feedback: a warning and a limit


async def test_open_feedback_is_announced_and_limited_per_client(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = api_settings.model_copy(update={"feedback_rate_per_minute": 5.0})
    with caplog.at_level(logging.WARNING, logger="services.api.app"):
        _, manager, client = await started(settings)
    try:
        assert any("POST /feedback is open" in r.getMessage() for r in caplog.records)
        answer = (await client.post("/predict", files={"file": ("a.jpg", jpeg())})).json()
        statuses = []
        for _ in range(8):
            response = await client.post("/feedback", json={"prediction_id": answer["id"], "label": "grass"})
            statuses.append(response.status_code)
        assert statuses[:5] == [201, 200, 200, 200, 200] and set(statuses[5:]) == {429}, statuses
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error_code"] == "TOO_MANY_REQUESTS"
        # Another client (another address) has a bucket of its own: the first one's flood costs it nothing.
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app, client=("192.0.2.7", 4000)),
                                  base_url="http://api")  # fmt: skip
        async with other:
            body = {"prediction_id": answer["id"], "label": "grass"}
            theirs = [(await other.post("/feedback", json=body)).status_code for _ in range(6)]
        assert theirs[:5] == [200] * 5 and theirs[5] == 429, theirs
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_feedback_with_a_token_is_not_rate_limited_and_says_how_to_authenticate(
    api_settings: ApiSettings,
) -> None:
    token = "t" * 32
    settings = api_settings.model_copy(update={"feedback_rate_per_minute": 1.0, "feedback_token": SecretStr(token)})
    _, manager, client = await started(settings)
    try:
        answer = (await client.post("/predict", files={"file": ("a.jpg", jpeg())})).json()
        body = {"prediction_id": answer["id"], "label": "grass"}
        refused = await client.post("/feedback", json=body)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {token}"}
        assert [(await client.post("/feedback", json=body, headers=auth)).status_code for _ in range(4)] == [
            201, 200, 200, 200,
        ]  # fmt: skip
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


# ---------------------------------------------------------------- 4. /feedback's own body limit


async def test_feedback_bodies_are_small_and_strict(client: httpx.AsyncClient) -> None:
    big = b'{"prediction_id": "' + b"0" * 32 + b'", "label": "grass", "x": [' + b"0," * 5000 + b"0]}"
    response = await client.post("/feedback", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "4 KiB" in response.json()["message"]

    async def chunks():  # no Content-Length: the limit must hold as the body streams in
        for _ in range(10):
            yield b" " * 1000

    streamed = await client.post("/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    extra = await client.post("/feedback", json={"prediction_id": "0" * 32, "label": "grass", "more": 1})
    assert extra.status_code == 400 and "more" in extra.json()["message"]


async def test_a_streamed_body_over_the_global_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks():
        for _ in range(20):
            yield b"0" * 500_000

    response = await client.post("/invocations", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "MiB" in response.json()["message"]


# ---------------------------------------------------------------- 5. a client that hangs up


async def test_a_client_that_hangs_up_is_not_a_server_error(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    messages = [{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"api"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"content-length", b"100000")],
        "client": ("127.0.0.1", 5555), "server": ("api", 80),
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            sent.clear()
            messages[:] = [{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}]
            await app(scope, receive, send)
            assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], "a traceback was logged"
    text = (await client.get("/metrics")).text
    assert not re.search(r'http_requests_total\{handler="/predict",method="POST",status="5xx"\}', text)
    assert re.search(r'http_requests_total\{handler="/predict",method="POST",status="4xx"\} 5\.0', text), text


# ---------------------------------------------------------------- 6. headers and slow bodies


async def test_too_many_or_too_large_headers_are_refused(client: httpx.AsyncClient) -> None:
    many = {f"x-h{i}": "1" for i in range(150)}
    assert (await client.get("/health/live", headers=many)).status_code == 431
    huge = await client.get("/health/live", headers={"x-big": "a" * 20_000})
    assert huge.status_code == 431 and huge.json()["error_code"] == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert (await client.get("/health/live", headers={"x-ok": "a" * 1000})).status_code == 200


@pytest.mark.slow  # trains the real champion
def test_slow_bodies_time_out_and_the_process_keeps_its_limits(real_champion) -> None:
    """A slow-body client gets 408 after API_BODY_READ_TIMEOUT_S and is disconnected; a 1 MB header and
    100,000 headers are refused; a Host header is never reflected; memory stays put under the probe's bodies."""
    settings, _ = real_champion
    port = free_port()
    env = api_env(settings.registry, API_BODY_READ_TIMEOUT_S="1.5")
    argv = [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    ready = lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200  # noqa: E731
    with running(argv, ready=ready, log=ARTIFACTS / "api-probes.log", env=env, what="the API") as process:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"in")  # fmt: skip
            started_at = time.monotonic()
            answer = slow.recv(4096)
            waited = time.monotonic() - started_at
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert waited < 5, waited

        big_header = httpx.get(f"{url}/health/live", headers={"x-big": "a" * 1_000_000})
        assert big_header.status_code in (400, 431), big_header.status_code
        raw = (
            b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(100_000)) + b"\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as many:
            many.sendall(raw)
            assert not many.recv(4096).startswith(b"HTTP/1.1 200"), "100,000 headers were accepted"

        redirected = httpx.get(f"{url}/model/", headers={"host": "evil.example"})
        assert redirected.status_code == 404 and "location" not in redirected.headers

        rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())[1])  # noqa: E731
        probe = [b'{"inputs":[' + b",".join([b"0"] * n) + b"]" + b" " * 70000 + b"}" for n in range(200, 208)]
        probe.append(b'{"inputs":[' + b",".join([b"0"] * 1_000_000) + b"]}")
        headers = {"content-type": "application/json"}
        for body in probe[:2]:  # warm: first-use allocations are not the probe's
            httpx.post(f"{url}/invocations", content=body, headers=headers, timeout=60)
        before = rss()
        for body in probe:
            response = httpx.post(f"{url}/invocations", content=body, headers=headers, timeout=60)
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])
        grown_mib = (rss() - before) / 1024
        assert grown_mib < 40, f"RSS grew by {grown_mib:.0f} MiB under the probe's bodies (it was ~400 MiB)"
        assert httpx.get(f"{url}/health/ready").status_code == 200


# ---------------------------------------------------------------- 7. hosts and forwarded headers


async def test_allowed_hosts_refuse_others(api_settings: ApiSettings) -> None:
    _, manager, client = await started(api_settings.model_copy(update={"allowed_hosts": ["api"]}))
    try:
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/live", headers={"host": "evil.example"})).status_code == 400
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


def _modelless_api_env(**extra: str) -> dict[str, str]:
    """A real API process whose registry does not answer: live, never ready, enough for /feedback's limiter
    (which runs before anything needs a model or the prediction log)."""
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "API_PREDICTION_LOG": "false",
        "API_RETRY_INITIAL_S": "5",
        "API_FEEDBACK_RATE_PER_MINUTE": "1",
        **extra,
    }


def _feedback_as(url: str, forwarded_for: str) -> int:
    body = {"prediction_id": "not-an-id", "label": "grass"}  # 400 when let through, 429 when limited
    return httpx.post(f"{url}/feedback", json=body, headers={"x-forwarded-for": forwarded_for}).status_code


@pytest.mark.parametrize(("allow", "believed"), [("127.0.0.1", True), ("192.0.2.1", False), (None, False)])
def test_forwarded_headers_are_believed_only_from_the_allowed_proxies(allow: str | None, believed: bool) -> None:
    """API_FORWARDED_ALLOW_IPS: from an allowed proxy (the test is its peer, 127.0.0.1) X-Forwarded-For names the
    client, so two forwarded clients have a feedback bucket each; from anyone else the header is ignored and
    both are the TCP peer, sharing one bucket."""
    extra = {"API_FORWARDED_ALLOW_IPS": allow} if allow is not None else {}
    with api_process(_modelless_api_env(**extra), ARTIFACTS / "api-forwarded.log", wait_ready=False) as url:
        assert [_feedback_as(url, "203.0.113.1") for _ in range(2)] == [400, 429]
        assert _feedback_as(url, "203.0.113.2") == (400 if believed else 429)


def test_api_workers_runs_that_many_processes() -> None:
    """API_WORKERS=2: two worker processes under the supervisor, answering on the one port."""
    env = _modelless_api_env(API_WORKERS="2")
    argv = [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port := free_port())]
    url = f"http://127.0.0.1:{port}"

    def children(pid: int) -> list[int]:
        """The supervisor's worker processes (not multiprocessing's resource tracker)."""
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [c for c in found if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def workers_serving() -> bool:  # every worker's server started (uvicorn logs each one's pid)
        started = log.read_text(errors="replace")
        workers = children(process.pid)
        return len(workers) >= 2 and all(f"Started server process [{w}]" in started for w in workers)

    log = ARTIFACTS / "api-workers.log"
    with running(argv, ready=lambda: httpx.get(f"{url}/health/live", timeout=2).status_code == 200, log=log,
                 env=env, what="the API with 2 workers") as process:  # fmt: skip
        wait_until(workers_serving, process, 120, log, "two serving workers")
        workers = children(process.pid)
        assert httpx.get(f"{url}/health/live").status_code == 200
        assert httpx.get(f"{url}/health/ready").status_code == 503  # no model anywhere: not ready
    assert len(workers) == 2, workers


# ---------------------------------------------------------------- 8. protocol and exposure


async def test_docs_are_local_with_security_headers(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        response = await client.get(page)
        assert response.status_code == 200
        assert not re.search(r"(src|href)=\"(https?:)?//", response.text), "an external asset"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert "<script>" not in response.text  # no inline script: the CSP forbids it
        for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', response.text):
            assert (await client.get(asset)).status_code == 200, asset
    schema = await client.get("/openapi.json")
    assert schema.status_code == 200 and len(schema.content) < 100_000, len(schema.content)


async def test_docs_can_be_turned_off(api_settings: ApiSettings) -> None:
    _, manager, client = await started(api_settings.model_copy(update={"docs": False}))
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/init.js"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/")).status_code == 200
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_405_says_what_is_allowed_and_head_works_where_get_does(client: httpx.AsyncClient) -> None:
    wrong = await client.put("/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    for path in ("/", "/health/live", "/health/ready", "/static/app.js"):
        head = await client.head(path)
        assert head.status_code == 200 and head.content == b"", path
        assert int(head.headers["content-length"]) > 0


async def test_not_ready_shows_a_category_not_the_error(api_settings: ApiSettings) -> None:
    source = FakeSource(fail=True)
    app = create_app(api_settings, source=source)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://api") as c,
    ):
        await asyncio.sleep(0.2)
        body = (await c.get("/health/ready")).json()
        assert body["last_error"] == "registry_unreachable"
        refused = (await c.post("/predict", files={"file": ("a.jpg", jpeg())})).json()
        assert "registry unreachable" not in refused["message"]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("a\x00b\u202egpj.exe", "abgpj.exe"),
        ("<i>x.png", "<i>x.png"),  # kept as text: the page renders it with textContent
        ("x" * 300 + ".jpeg", "x" * 94 + "….jpeg"),
        ("\u200b", None),
        (None, None),
    ],
)
def test_upload_names_are_base_names_without_control_characters(given: str | None, kept: str | None) -> None:
    assert safe_filename(given) == kept
    assert kept is None or len(kept) <= 100


async def test_predict_echoes_only_the_safe_name(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", files={"file": ("../../x\u202e.jpg", jpeg(), "image/jpeg")})
    assert response.status_code == 200 and response.json()["filename"] == "x.jpg"
