"""The in-domain flag through the API, with a fake model that returns a distance column as the LiteRT export
does: the /predict fields, the /invocations header (body unchanged), the metrics, the prediction log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import wait_ready
from tests.api.fakes import FakeSource, distance, yellowness
from tests.api.test_app import metric, png
from tests.api.test_prediction_log import rows, until

THRESHOLD = 0.3
YELLOW, WHITE = png((250, 220, 20)), png((255, 255, 255))  # mean brightness 0.64 (in), 1.0 (out)


@pytest.fixture
async def scored(api_settings: ApiSettings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    source = FakeSource()
    source.domain_threshold = THRESHOLD
    app = create_app(api_settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            yield client, app


async def test_predict_says_whether_the_photo_looks_like_the_training_photos(scored) -> None:
    client, _ = scored
    body = (await client.post("/predict", files=[("file", ("y.png", YELLOW)), ("file", ("w.png", WHITE))])).json()
    flower, blank = body
    assert flower["in_domain"] is True and flower["domain_distance"] == pytest.approx(0.24, abs=0.01)
    # Out of domain: still its label and probabilities (nothing hidden), and the flag.
    assert blank["in_domain"] is False and blank["domain_distance"] == pytest.approx(0.6, abs=0.01)
    assert blank["label"] in ("dandelion", "grass") and set(blank["probabilities"]) == {"dandelion", "grass"}


async def test_invocations_keep_mlflows_body_and_flag_in_a_header(scored) -> None:
    client, _ = scored
    images = np.stack([np.full((224, 224, 3), 0.45, np.float32), np.ones((224, 224, 3), np.float32)])
    response = await client.post(
        "/invocations", content=orjson.dumps({"inputs": images}, option=orjson.OPT_SERIALIZE_NUMPY),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 200
    assert response.headers["x-in-domain"] == "true,false"
    assert len(response.headers["x-prediction-ids"].split(",")) == 2
    # The body is only the probabilities, as mlflow models serve answers: no distance column.
    assert list(response.json()) == ["predictions"]
    np.testing.assert_allclose(response.json()["predictions"], yellowness(images), atol=1e-6)
    assert distance(images).tolist() == pytest.approx([0.05, 0.6])


async def test_metrics_count_and_share(scored) -> None:
    client, app = scored
    for data in (YELLOW, WHITE, WHITE):
        assert (await client.post("/predict", files={"file": ("x.png", data)})).status_code == 200
    await app.state.classifier.drain()  # the drift window is fed just after each answer
    text = (await client.get("/metrics")).text
    assert metric(text, 'model_out_of_domain_total{version="1"}') == 2
    assert metric(text, "model_out_of_domain_share ") == pytest.approx(2 / 3)


async def test_a_model_without_the_score_says_nothing(client: httpx.AsyncClient) -> None:
    """Versions trained before the in-domain score (or served on TensorFlow): null, no header, no series."""
    body = (await client.post("/predict", files={"file": ("w.png", WHITE)})).json()
    assert body["in_domain"] is None and body["domain_distance"] is None
    response = await client.post(
        "/invocations", content=orjson.dumps({"inputs": [np.ones((224, 224, 3)).tolist()]}),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert "x-in-domain" not in response.headers
    await asyncio.sleep(0)
    assert "\nmodel_out_of_domain_share " not in (await client.get("/metrics")).text


async def test_the_prediction_log_keeps_the_distance_and_the_verdict(scored, api_settings: ApiSettings) -> None:
    client, _ = scored
    answers = (await client.post("/predict", files=[("file", ("y.png", YELLOW)), ("file", ("w.png", WHITE))])).json()

    async def logged() -> bool:
        return len(await rows(api_settings)) == 2

    await until(logged)
    stored = {row.id: (row.domain_distance, row.in_domain) for row in await rows(api_settings)}
    for answer in answers:
        distance_, in_domain = stored[answer["id"]]
        assert distance_ == pytest.approx(answer["domain_distance"]) and bool(in_domain) is answer["in_domain"]


async def test_a_refused_kind_is_named_and_explain_returns_the_map_only_when_asked(api_settings: ApiSettings) -> None:
    source = FakeSource()
    source.domain_threshold, source.neither_threshold, source.explains = THRESHOLD, 0.5, True
    rose = png((230, 40, 80))  # near in brightness (0.45), but red: the fake's refused kind
    app = create_app(api_settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            files = [("file", ("r.png", rose)), ("file", ("w.png", WHITE)), ("file", ("y.png", YELLOW))]
            plain = (await client.post("/predict", files=files)).json()
            explained = (await client.post("/predict?explain=true", files=files)).json()
    refused, blank, flower = plain
    assert (refused["in_domain"], refused["out_of_domain_reason"]) == (False, "looks_like_refused_kind")
    assert refused["neither"] > 0.5 and refused["domain_distance"] < THRESHOLD  # the distance alone let it in
    assert (blank["in_domain"], blank["out_of_domain_reason"]) == (False, "unlike_training_photos")
    assert (flower["in_domain"], flower["out_of_domain_reason"]) == (True, None) and flower["neither"] < 0.5
    assert all("explain" not in answer for answer in plain)  # computed only when asked
    for answer in explained:
        explain = answer["explain"]
        assert explain["for"] == answer["label"] and explain["grid"] == [3, 3]
        assert np.asarray(explain["evidence"]).shape == (3, 3)
        assert explain["png"].startswith("data:image/png;base64,")
    # The map is the answer's side of the evidence: a yellow photo argued for dandelion in every cell.
    assert explained[2]["label"] == "dandelion" and np.min(explained[2]["explain"]["evidence"]) > 0
