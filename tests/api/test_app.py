"""The API with a fake model: routes, errors, content types, limits, metrics, probes and model swaps."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import eventually, wait_ready
from tests.api.fakes import FakeSource, yellowness
from tests.crafted import crafted_jpeg


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


YELLOW, GREEN = png((250, 220, 20)), png((40, 150, 30))


@asynccontextmanager
async def serving(settings: ApiSettings, source: FakeSource) -> AsyncIterator[httpx.AsyncClient]:
    """The app with ``settings`` and ``source``, ready, and a client to it."""
    async with LifespanManager(create_app(settings, source=source)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            yield client


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait until the awaitable ``condition()`` is true; TimeoutError after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.02)):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")


async def failed_loads(client: httpx.AsyncClient, more_than: float) -> bool:
    return (metric((await client.get("/metrics")).text, "model_load_failures_total") or 0) > more_than


async def served_version(client: httpx.AsyncClient, version: str) -> bool:
    return (await client.get("/model")).json()["version"] == version


async def test_predict_one_file(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", files={"file": ("flower.png", YELLOW, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == "dandelion"
    assert body["confidence"] == pytest.approx(body["probabilities"]["dandelion"])
    assert set(body["probabilities"]) == {"dandelion", "grass"}
    assert body["model"] == {"name": "fake-model", "version": "1"}
    assert response.headers["x-model-version"] == "1"
    assert body["low_confidence"] is False


async def test_an_unsure_answer_says_so(client: httpx.AsyncClient) -> None:
    """Below API_LOW_CONFIDENCE_THRESHOLD (0.7) the answer carries ``low_confidence`` (the page: "not sure")."""
    murky = png((200, 200, 110))  # the fake model's boundary: about 51 % dandelion
    response = await client.post("/predict", files={"file": ("murky.png", murky, "image/png")})
    body = response.json()
    assert 0.5 <= body["confidence"] < 0.7 and body["low_confidence"] is True


async def test_predict_several_files_answers_in_order(client: httpx.AsyncClient) -> None:
    files = [("file", ("a.png", GREEN)), ("file", ("b.png", YELLOW)), ("file", ("c.jpg", crafted_jpeg("grass", 3)))]
    response = await client.post("/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert [r["label"] for r in body] == ["grass", "dandelion", "grass"]
    assert [r["filename"] for r in body] == ["a.png", "b.png", "c.jpg"]


@pytest.mark.parametrize(
    ("files", "data", "headers", "status", "code"),
    [
        ({"file": ("notes.jpg", b"just some text", "image/jpeg")}, None, None, 400, "INVALID_IMAGE"),
        ({"file": ("empty.jpg", b"", "image/jpeg")}, None, None, 400, "INVALID_IMAGE"),
        ({"photo": ("x.png", YELLOW, "image/png")}, None, None, 400, "BAD_REQUEST"),
        ({"other": ("x.png", YELLOW, "image/png")}, {"file": "not a file"}, None, 400, "BAD_REQUEST"),
        (None, {"file": "urlencoded, not multipart"}, None, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (None, None, {"content-type": "application/json"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (None, None, {"content-type": "image/png"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
async def test_predict_refusals(client, files, data, headers, status, code) -> None:
    if headers:
        response = await client.post("/predict", content=YELLOW, headers=headers)
    else:
        response = await client.post("/predict", files=files, data=data)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code and body["message"]


async def test_predict_limits(client: httpx.AsyncClient) -> None:
    too_many = [("file", (f"{i}.png", GREEN)) for i in range(5)]
    assert (await client.post("/predict", files=too_many)).status_code == 400
    big = np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 2_000_000
    response = await client.post("/predict", files={"file": ("big.png", buffer.getvalue())})
    assert response.status_code == 413 and response.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    response = await client.post(
        "/invocations", content=b"{" + b" " * 9_000_000 + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def seed_payload(*colors: tuple[int, int, int]) -> dict:
    return {"inputs": [np.full((224, 224, 3), np.array(c) / 255, np.float32).tolist() for c in colors]}


async def test_invocations_seed_payload(client: httpx.AsyncClient) -> None:
    payload = seed_payload((250, 220, 20), (40, 150, 30))
    response = await client.post("/invocations", json=payload)
    assert response.status_code == 200, response.text
    predictions = np.array(response.json()["predictions"])
    expected = yellowness(np.array(payload["inputs"], np.float32))
    np.testing.assert_allclose(predictions, expected, atol=1e-6)
    assert predictions.argmax(axis=1).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((1, 224, 224, 3), 200.0), "from 200 to 200: divide 0-255 pixel values by 255"),
        (np.concatenate([np.zeros((1, 224, 224, 3)), np.full((1, 224, 224, 3), 255.0)]), "from 0 to 255: divide"),
        (np.full((1, 224, 224, 3), -0.5), "from -0.5 to -0.5"),
        (np.full((1, 224, 224, 3), 1e31), "from 1e+31 to 1e+31"),
    ],
    ids=["0-255 pixels", "one image of two", "negative", "absurd"],
)
async def test_invocations_refuse_pixels_outside_0_1(
    client: httpx.AsyncClient, pixels: np.ndarray, message: str
) -> None:
    """0-255 pixels would get a confident, meaningless answer: refused with what to do instead."""
    response = await client.post(
        "/invocations", content=orjson.dumps({"inputs": pixels.tolist()}), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error_code"] == "BAD_REQUEST"
    assert error["message"].startswith("inputs must be pixel values in [0, 1]; this input has values ")
    assert message in error["message"]
    # The edges themselves, and float rounding of x / 255 just past them, are fine.
    edges = np.zeros((1, 224, 224, 3), np.float32)
    edges[0, 0, 0] = [1.0, 1.0000001, 0.0]
    ok = await client.post("/invocations", content=orjson.dumps({"inputs": edges.tolist()}),
                           headers={"content-type": "application/json"})  # fmt: skip
    assert ok.status_code == 200, ok.text


async def test_invocations_all_formats_agree(client: httpx.AsyncClient) -> None:
    image = np.full((224, 224, 3), 0.3, np.float32)
    image[..., 2] = 0.1
    flat = image.reshape(-1).tolist()
    payloads = [
        {"inputs": [image.tolist()]},
        {"instances": [image.tolist()]},
        {"inputs": [image.tolist()], "params": {"anything": 1}},
        {"dataframe_split": {"columns": [str(i) for i in range(len(flat))], "data": [flat]}},
        {"dataframe_records": [{str(i): v for i, v in enumerate(flat)}]},
    ]
    answers = []
    for payload in payloads:
        response = await client.post(
            "/invocations", content=orjson.dumps(payload), headers={"content-type": "application/json; charset=utf-8"}
        )
        assert response.status_code == 200, (list(payload), response.text)
        answers.append(response.json()["predictions"])
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], atol=1e-7)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"{not json", 400),
        (b"[1, 2, 3]", 400),
        (b'{"data": [1]}', 400),
        (b'{"inputs": [], "instances": []}', 400),
        (b'{"inputs": [[[0.1, 0.2, 0.3]]]}', 400),
        (b'{"inputs": [["a", "b"]]}', 400),
        (b'{"inputs": null}', 400),
        (b'{"inputs": [NaN]}', 400),
        (b'{"inputs": [1e999]}', 400),
        (b'{"inputs": {"image": [1]}}', 400),
        (b'"just a string"', 400),
        (b"[" * 5000 + b"]" * 5000, 400),
    ],
)
async def test_invocations_bad_input(client: httpx.AsyncClient, body: bytes, status: int) -> None:
    response = await client.post("/invocations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error_code", "message"}
    assert body[:40].decode(errors="ignore") not in error["message"] or len(body) < 3


@pytest.mark.parametrize(
    "content_type",
    [
        "text/csv",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/json; format=pandas-split",
        None,
    ],
)
async def test_invocations_content_types(client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/invocations", content=orjson.dumps(seed_payload((0, 0, 0))), headers=headers)
    assert response.status_code == 415
    assert response.json()["error_code"] == "UNSUPPORTED_MEDIA_TYPE"


async def test_too_many_instances(client: httpx.AsyncClient) -> None:
    response = await client.post("/invocations", json=seed_payload(*[(0, 0, 0)] * 9))
    assert response.status_code == 413


async def test_probes_model_and_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).json() == {"status": "alive"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["model"]["version"] == "1"
    for path in ("/ping", "/health"):
        response = await client.get(path)
        assert response.status_code == 200 and response.text == "\n"
    assert (await client.get("/version")).text.count(".") >= 1
    info = (await client.get("/model")).json()
    assert info["labels"] == ["dandelion", "grass"]
    assert info["input_shape"] == [-1, 224, 224, 3]
    assert info["run_id"] == "run-1" and info["alias"] == "champion" and info["loaded_at"]
    openapi = (await client.get("/openapi.json")).json()
    assert {"/predict", "/invocations", "/model", "/health/ready"} <= set(openapi["paths"])


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_move_with_traffic(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    await client.post("/predict", files={"file": ("a.png", YELLOW)})
    await client.post("/predict", files={"file": ("b.png", GREEN)})
    await client.post("/predict", files={"file": ("c.png", b"nope")})
    await client.get("/health/ready")
    after = (await client.get("/metrics")).text
    assert (
        metric(after, 'model_predictions_total{label="dandelion"}')
        == metric(before, 'model_predictions_total{label="dandelion"}') + 1
    )
    assert (
        metric(after, 'model_predictions_total{label="grass"}')
        == metric(before, 'model_predictions_total{label="grass"}') + 1
    )
    assert metric(after, "model_prediction_confidence_count") == 2
    assert metric(after, "model_inference_seconds_count") >= 2
    assert 'model_info{alias="champion",name="fake-model",run_id="run-1",version="1"} 1.0' in after
    assert "model_ready 1.0" in after
    assert metric(after, 'http_requests_total{handler="/predict",method="POST",status="2xx"}') == 2
    assert metric(after, 'http_requests_total{handler="/predict",method="POST",status="4xx"}') == 1
    assert 'handler="/health/ready"' not in after and 'handler="/metrics"' not in after
    assert "http_request_duration_seconds_bucket" in after and "model_batch_size_bucket" in after
    assert "process_resident_memory_bytes" in after


async def test_not_ready_until_the_registry_answers(api_settings: ApiSettings) -> None:
    source = FakeSource(fail=True)
    app = create_app(api_settings, source=source)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://api") as c,
    ):
        await until(lambda: failed_loads(c, more_than=1))
        assert (await c.get("/health/live")).status_code == 200
        not_ready = await c.get("/health/ready")
        # A category, not the exception text (which can name hosts and paths): that goes to the log.
        assert not_ready.status_code == 503 and not_ready.json()["last_error"] == "registry_unreachable"
        response = await c.post("/predict", files={"file": ("a.png", YELLOW)})
        assert response.status_code == 503 and response.json()["error_code"] == "MODEL_NOT_READY"
        assert (await c.post("/invocations", json=seed_payload((0, 0, 0)))).status_code == 503
        assert (await c.get("/ping")).status_code == 503
        assert metric((await c.get("/metrics")).text, "model_load_failures_total") >= 2
        source.fail = False
        await wait_ready(c)
        assert (await c.post("/predict", files={"file": ("a.png", YELLOW)})).status_code == 200


class _NotYetRegistered(FakeSource):
    """The registry answers, but nothing is registered under the alias until ``registered``; then it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.registered = False
        self.answers = 0

    def resolve(self) -> tuple[str, str]:
        self.answers += 1
        if self.fail:
            raise ConnectionError("registry unreachable")
        if not self.registered:
            raise RuntimeError("RESOURCE_DOES_NOT_EXIST: Registered model alias champion not found.")
        return super().resolve()


async def test_while_nothing_is_registered_yet_the_replica_asks_again_soon(caplog: pytest.LogCaptureFixture) -> None:
    # A stack's first start: the trainer is still at work. The backoff stops growing at no_model_retry_s, so a
    # replica is ready soon after the promotion instead of up to retry_max_s later; an unreachable registry
    # still backs off to retry_max_s.
    import logging
    import re

    from services.api.metrics import ApiMetrics
    from services.api.runtime import ModelRuntime

    caplog.set_level(logging.WARNING, logger="services.api.runtime")
    source = _NotYetRegistered()
    runtime = ModelRuntime(source, ApiMetrics(), 60, retry_initial_s=0.1, retry_max_s=100, no_model_retry_s=0.2)

    def waits() -> list[float]:
        found = [re.search(r"retrying in ([\d.]+) s", r.getMessage()) for r in caplog.records]
        return [float(m.group(1)) for m in found if m]

    task = asyncio.create_task(runtime.run())
    try:
        await eventually(lambda: source.answers >= 5)
        assert waits()[:4] == [0.1, 0.2, 0.2, 0.2]  # not 0.4, 0.8: the bound for "nothing registered yet"
        assert runtime.last_error_kind == "no_model_registered"
        source.registered = True
        await eventually(lambda: runtime.ready)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    caplog.clear()
    source = _NotYetRegistered()
    source.fail = True
    runtime = ModelRuntime(source, ApiMetrics(), 60, retry_initial_s=0.1, retry_max_s=100, no_model_retry_s=0.1)
    task = asyncio.create_task(runtime.run())
    try:
        await eventually(lambda: source.answers >= 4)
        assert waits()[:3] == [0.1, 0.2, 0.4]  # unreachable: the full backoff
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


SWAP_SLACK_S = 2.0
"""What a swap may take beyond the poll interval with the fake model (a resolve and a load: milliseconds, here
stated generously for a loaded machine); far below ``retry_max_s``, which a poll on the wrong setting waits."""


async def test_new_version_swapped_in_within_the_poll_interval_without_failures(api_settings: ApiSettings) -> None:
    """Polled every 0.05 s while the backoff's bound is 30 s: the new version serves within the poll interval
    plus SWAP_SLACK_S, and no request fails or goes back to the old model around the swap."""
    settings = api_settings.model_copy(update={"poll_interval_s": 0.05, "retry_max_s": 30.0})
    source = FakeSource()
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()
    async with serving(settings, source) as client:

        async def traffic() -> None:
            while not stop.is_set():
                r = await client.post("/predict", files={"file": ("a.png", GREEN)})
                seen.append((r.status_code, r.json()["model"]["version"]))
                await asyncio.sleep(0)

        task = asyncio.create_task(traffic())
        try:
            await eventually(lambda: len(seen) >= 5)
            source.version = "2"
            promoted_at = asyncio.get_running_loop().time()
            await eventually(lambda: seen[-1][1] == "2", timeout_s=settings.poll_interval_s + SWAP_SLACK_S)
            swapped_after = asyncio.get_running_loop().time() - promoted_at
            after = len(seen)
            await eventually(lambda: len(seen) >= after + 5)
        finally:
            stop.set()
            await task
        assert (await client.get("/model")).json()["version"] == "2"
    print(f"swapped {swapped_after:.3f} s after the alias moved (poll interval {settings.poll_interval_s} s)")
    assert all(status == 200 for status, _ in seen), {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions), "never back to the old model once the new one serves"


async def test_registry_down_while_serving_keeps_the_model(client: httpx.AsyncClient, source: FakeSource) -> None:
    failures = metric((await client.get("/metrics")).text, "model_load_failures_total")
    source.fail = True
    await until(lambda: failed_loads(client, more_than=failures + 1))  # two polls failed while serving
    response = await client.post("/predict", files={"file": ("a.png", GREEN)})
    assert response.status_code == 200 and response.json()["model"]["version"] == "1"
    assert (await client.get("/health/ready")).status_code == 200
    source.fail = False
    source.version = "5"
    await until(lambda: served_version(client, "5"))


async def test_unknown_route_is_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404 and response.json()["error_code"] == "NOT_FOUND"


async def test_cors_closed_by_default(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/predict", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers
    answer = await client.post("/predict", files={"file": ("a.png", GREEN)}, headers={"origin": "https://evil.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


async def test_cors_origins_from_the_environment_are_allowed_and_no_others(
    api_settings: ApiSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """API_CORS_ORIGINS turns CORS on for exactly the origins it lists."""
    monkeypatch.setenv("API_CORS_ORIGINS", '["https://app.example"]')
    settings = api_settings.model_copy(update={"cors_origins": ApiSettings().cors_origins})
    assert settings.cors_origins == ["https://app.example"]
    async with serving(settings, FakeSource()) as client:
        preflight = {"access-control-request-method": "POST"}
        allowed = await client.options("/predict", headers={"origin": "https://app.example", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        refused = await client.options("/predict", headers={"origin": "https://evil.example", **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        answer = await client.post(
            "/predict", files={"file": ("a.png", GREEN)}, headers={"origin": "https://app.example"}
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        other = await client.post(
            "/predict", files={"file": ("a.png", GREEN)}, headers={"origin": "https://evil.example"}
        )
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


async def test_started_where_no_model_was_registered_it_says_so_and_creates_nothing(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded default tracking URI is relative: started from another folder, the API used to create an
    empty MLflow database there and retry forever with MLflow's "not found"."""
    import logging

    from services.api.registry import MlflowSource
    from shared.settings import RegistrySettings

    elsewhere = tmp_path / "elsewhere"
    registry = RegistrySettings(tracking_uri=f"sqlite:///{elsewhere}/var/mlflow.db")
    settings = ApiSettings(registry=registry, prediction_log=False, retry_initial_s=0.05, retry_max_s=0.1)
    caplog.set_level(logging.WARNING, logger="services.api.runtime")
    app = create_app(settings, source=MlflowSource(registry))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            for _ in range(100):
                body = (await client.get("/health/ready")).json()
                if body.get("last_error"):
                    break
                await asyncio.sleep(0.05)
    assert body == {"status": "not ready", "reason": body["reason"], "last_error": "no_model_registered"}
    message = next(r.getMessage() for r in caplog.records if "model refresh failed" in r.getMessage())
    assert f"the registry at {registry.tracking_uri}, asked for dandelion-grass@champion, has no such model" in message
    assert "the trainer has not registered one there yet" in message and str(elsewhere / "var") in message
    assert not elsewhere.exists(), "the API created files where it was started"


async def test_the_concurrency_limit_refuses_requests_but_never_probes(api_settings: ApiSettings) -> None:
    """API_LIMIT_CONCURRENCY=2: with two requests in progress (their bodies still arriving), a third answers 503
    with Retry-After, while the probes and /metrics answer 200; once one finishes, requests are served again."""
    settings = api_settings.model_copy(update={"limit_concurrency": 2})
    app = create_app(settings, source=FakeSource())
    release = asyncio.Event()
    reading = 0

    async def slow_body():
        nonlocal reading
        yield b'{"inputs": '
        reading += 1  # the app asked for the rest of the body: the request is in progress
        await release.wait()
        yield orjson.dumps([np.full((224, 224, 3), 0.5).tolist()]) + b"}"

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            headers = {"content-type": "application/json"}
            held = [asyncio.create_task(client.post("/invocations", content=slow_body(), headers=headers))
                    for _ in range(2)]  # fmt: skip
            await eventually(lambda: reading == 2)  # both are in progress, their bodies half read
            refused = await client.post("/predict", files={"file": ("y.png", YELLOW)})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1", refused.text
            assert refused.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
            for probe in ("/health/live", "/health/ready", "/ping", "/metrics"):
                assert (await client.get(probe)).status_code == 200, probe
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.post("/predict", files={"file": ("y.png", YELLOW)})).status_code == 200
