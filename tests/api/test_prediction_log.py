"""The prediction log and feedback with a fake model, on a real (SQLite) database and a real local store.

The MariaDB/S3 versions, with the database stopped under load, are in ``test_closing_loop_stack.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re

import httpx
import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr
from sqlalchemy import func, select

from services.api.app import create_app
from services.api.metrics import ApiMetrics
from services.api.predlog import PredictionLog, Record
from services.api.settings import ApiSettings
from shared.db import open_database
from shared.descriptors import DESCRIPTOR_COLUMNS, describe_array, prepare
from shared.settings import DatabaseSettings, ObjectStoreSettings
from shared.tables import FeedbackRow, PredictionRow
from tests.api.conftest import wait_ready
from tests.api.fakes import FakeSource
from tests.api.test_app import png
from tests.crafted import crafted_jpeg

DANDELION, GRASS = png((250, 220, 20)), crafted_jpeg("grass", 2)  # what the fake model calls each class


@contextlib.asynccontextmanager
async def serving(settings: ApiSettings, source: FakeSource | None = None):
    """The app with ``settings`` (and a fake model), started, and a client to it."""
    app = create_app(settings, source=source or FakeSource())
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://api") as client,
    ):
        await wait_ready(client)
        yield app, client


async def rows(settings: ApiSettings, model=PredictionRow) -> list:
    async with open_database(settings.database) as sessions, sessions() as session:
        return list((await session.scalars(select(model))).all())


async def until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def test_predict_answers_carry_an_id_and_every_prediction_is_logged(
    client: httpx.AsyncClient, api_settings: ApiSettings
) -> None:
    files = [("file", ("a.png", DANDELION, "image/png")), ("file", ("b.jpg", GRASS, "image/jpeg"))]
    answers = (await client.post("/predict", files=files)).json()
    ids = [a["id"] for a in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 2

    async def logged() -> bool:
        return len(await rows(api_settings)) == 2

    await until(logged)
    by_id = {r.id: r for r in await rows(api_settings)}
    for answer, data in zip(answers, (DANDELION, GRASS), strict=True):
        row = by_id[answer["id"]]
        assert (row.endpoint, row.model_name, row.model_version) == ("predict", "fake-model", "1")
        assert row.label == answer["label"] and row.confidence == pytest.approx(answer["confidence"])
        assert row.latency_ms > 0
        assert row.image_key is None and row.image_sha256 is None  # uploads are not kept by default
        expected = prepare(data).descriptors  # the feature store's numbers, computed by the same code
        assert {c: getattr(row, c) for c in DESCRIPTOR_COLUMNS} == pytest.approx(expected)
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "prediction_log_written_total") == 2
    assert metric(metrics, "prediction_log_healthy") == 1


async def test_invocations_ids_travel_in_a_header_and_are_logged(
    client: httpx.AsyncClient, api_settings: ApiSettings
) -> None:
    x = np.round(np.random.default_rng(0).random((3, 224, 224, 3)), 2)  # short JSON numbers: under the body limit
    response = await client.post("/invocations", content=orjson.dumps({"inputs": x.tolist()}),
                                 headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 200
    assert set(response.json()) == {"predictions"}  # the body stays MLflow's
    ids = response.headers["x-prediction-ids"].split(",")
    assert len(ids) == 3

    async def logged() -> bool:
        return len(await rows(api_settings)) == 3

    await until(logged)
    by_id = {r.id: r for r in await rows(api_settings)}
    for i, prediction_id in enumerate(ids):
        row = by_id[prediction_id]
        assert row.endpoint == "invocations" and (row.width, row.height) == (224, 224)
        assert row.rgb_r_mean == pytest.approx(describe_array(x[i])["rgb_r_mean"])


async def test_feedback_validates_is_idempotent_and_counts(client: httpx.AsyncClient, api_settings) -> None:
    answer = (await client.post("/predict", files={"file": ("d.png", DANDELION, "image/png")})).json()
    assert answer["label"] == "dandelion"
    pid = answer["id"]
    # Right after the answer: the row may still be queued; the feedback waits for it instead of a 404.
    first = await client.post("/feedback", json={"prediction_id": pid, "label": "grass"})
    assert first.status_code == 201, first.text
    assert first.json() | {} == {
        "prediction_id": pid,
        "label": "grass",
        "predicted": "dandelion",
        "correct": False,
        "in_domain": None,  # the fake model has no in-domain score here
        "domain_outcome": None,
        "model": {"name": "fake-model", "version": "1"},
        "status": "recorded",
    }
    again = await client.post("/feedback", json={"prediction_id": pid, "label": "grass"})
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    other = await client.post("/feedback", json={"prediction_id": pid, "label": "dandelion"})
    assert other.status_code == 409 and other.json()["error_code"] == "RESOURCE_CONFLICT"
    unknown = await client.post("/feedback", json={"prediction_id": "0" * 32, "label": "grass"})
    assert unknown.status_code == 404
    for bad in (
        {"prediction_id": "not-an-id", "label": "grass"},
        {"prediction_id": pid, "label": "daisy"},
        {"prediction_id": pid},
        {"label": "grass"},
    ):
        response = await client.post("/feedback", json=bad)
        assert response.status_code == 400, (bad, response.text)
        assert "daisy" not in response.text  # never echoed
    truncated = await client.post("/feedback", content=b"{", headers={"content-type": "application/json"})
    assert truncated.status_code == 400
    stored = await rows(api_settings, FeedbackRow)
    assert [(f.prediction_id, f.label) for f in stored] == [(pid, "grass")]
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "model_feedback_total", outcome="wrong", version="1") == 1
    assert metric(metrics, "model_feedback_total", outcome="correct", version="1") is None


async def test_live_accuracy_gauge_comes_from_the_database(api_settings: ApiSettings) -> None:
    settings = api_settings.model_copy(update={"prediction_log_flush_interval_s": 0.05})
    async with serving(settings) as (app, client):
        app.state.predlog.accuracy_refresh_s = 0.05
        verdicts = [("d.png", DANDELION, "dandelion"), ("g.jpg", GRASS, "grass"), ("g2.jpg", GRASS, "dandelion")]
        for name, data, truth in verdicts:
            pid = (await client.post("/predict", files={"file": (name, data, "image/jpeg")})).json()["id"]
            assert (await client.post("/feedback", json={"prediction_id": pid, "label": truth})).status_code == 201

        async def refreshed() -> bool:
            text = (await client.get("/metrics")).text
            return metric(text, "model_live_accuracy_samples") == 3

        await until(refreshed)
        text = (await client.get("/metrics")).text
        assert metric(text, "model_live_accuracy") == pytest.approx(2 / 3)


async def test_neither_feedback_is_stored_and_counted_as_evidence_about_the_flag(api_settings: ApiSettings) -> None:
    """``neither`` is a third answer: stored as such, kept out of live accuracy, and counted against the answer's
    in-domain verdict (confirmed flag, missed flag, wrongly flagged)."""
    settings = api_settings.model_copy(update={"prediction_log_flush_interval_s": 0.05})
    source = FakeSource()
    source.domain_threshold = 0.3  # the fake's distance: a white photo is far (0.6), the yellow one near (0.24)
    white, yellow = png((255, 255, 255)), DANDELION
    async with serving(settings, source) as (app, client):
        app.state.predlog.accuracy_refresh_s = 0.05
        told = [(white, "neither"), (yellow, "neither"), (white, "grass"), (yellow, "dandelion")]
        answers = []
        for data, label in told:
            answer = (await client.post("/predict", files={"file": ("p.png", data, "image/png")})).json()
            response = await client.post("/feedback", json={"prediction_id": answer["id"], "label": label})
            assert response.status_code == 201, response.text
            answers.append((answer, response.json()))
        (flagged, confirmed), (_, missed), (_, wrongly), (_, right) = answers
        assert flagged["in_domain"] is False and flagged["out_of_domain_reason"] == "unlike_training_photos"
        assert confirmed["label"] == "neither" and confirmed["correct"] is None  # no verdict on the two classes
        assert (confirmed["in_domain"], confirmed["domain_outcome"]) == (False, "confirmed_out_of_domain")
        assert (missed["in_domain"], missed["domain_outcome"]) == (True, "missed_out_of_domain")
        assert wrongly["domain_outcome"] == "wrongly_flagged" and right["domain_outcome"] == "confirmed_in_domain"
        assert right["correct"] is True
        again = await client.post("/feedback", json={"prediction_id": flagged["id"], "label": "neither"})
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
        other = await client.post("/feedback", json={"prediction_id": flagged["id"], "label": "grass"})
        assert other.status_code == 409

        stored = {f.prediction_id: f.label for f in await rows(settings, FeedbackRow)}
        logged = {r.id: r for r in await rows(settings)}
        assert stored[flagged["id"]] == "neither" and logged[flagged["id"]].in_domain is False
        assert sorted(stored.values()) == ["dandelion", "grass", "neither", "neither"]

        outcomes = ("confirmed_out_of_domain", "missed_out_of_domain", "wrongly_flagged", "confirmed_in_domain")

        async def refreshed() -> bool:  # a refresh that began before the last feedback was written shows less
            text = (await client.get("/metrics")).text
            return [metric(text, "model_live_domain_feedback", outcome=o) for o in outcomes] == [1, 1, 1, 1]

        await until(refreshed)
        text = (await client.get("/metrics")).text
        for outcome in outcomes:
            assert metric(text, "model_domain_feedback_total", outcome=outcome, version="1") == 1, outcome
        assert metric(text, "model_feedback_total", outcome="neither", version="1") == 2
        # Live accuracy over the two dandelion/grass labels only (both right); neither counted as wrong would say 0.5.
        assert metric(text, "model_live_accuracy_samples") == 2
        assert metric(text, "model_live_accuracy") == 1


async def test_feedback_token_when_configured(api_settings: ApiSettings) -> None:
    token = "a-long-enough-test-token"
    async with serving(api_settings.model_copy(update={"feedback_token": SecretStr(token)})) as (_, client):
        pid = (await client.post("/predict", files={"file": ("g.jpg", GRASS, "image/jpeg")})).json()["id"]
        body = {"prediction_id": pid, "label": "grass"}
        assert (await client.post("/feedback", json=body)).status_code == 401
        wrong = await client.post("/feedback", json=body, headers={"authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        right = await client.post("/feedback", json=body, headers={"authorization": f"bearer {token}"})
        assert right.status_code == 201  # the scheme is case-insensitive (RFC 7235)
    for weak in ("s3cret", "REPLACE_ME", "REPLACE_ME-but-longer-than-16"):
        with pytest.raises(ValueError, match="API_FEEDBACK_TOKEN"):
            ApiSettings(feedback_token=weak)
    assert ApiSettings(feedback_token="").feedback_token is None


@pytest.mark.parametrize("api_settings", [ApiSettings(prediction_log=False)])
async def test_without_the_log_predictions_still_work_and_feedback_says_why(client: httpx.AsyncClient) -> None:
    answer = (await client.post("/predict", files={"file": ("g.jpg", GRASS, "image/jpeg")})).json()
    assert answer["label"] == "grass" and len(answer["id"]) == 32
    response = await client.post("/feedback", json={"prediction_id": answer["id"], "label": "grass"})
    assert response.status_code == 503 and "API_PREDICTION_LOG" in response.json()["message"]
    metrics = (await client.get("/metrics")).text
    assert "prediction_log_" not in metrics and "model_live_accuracy" not in metrics  # off by choice: no alert


async def test_absurd_inputs_are_refused_instead_of_answered_nan(client: httpx.AsyncClient, api_settings) -> None:
    body = orjson.dumps({"inputs": np.full((1, 224, 224, 3), 1e31).tolist()})
    response = await client.post("/invocations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "[0, 1]" in response.json()["message"]
    ok = await client.post("/predict", files={"file": ("g.jpg", GRASS, "image/jpeg")})
    assert ok.status_code == 200

    async def logged() -> bool:
        return len(await rows(api_settings)) == 1

    await until(logged)
    metrics = (await client.get("/metrics")).text
    assert "NaN" not in metrics.split("model_prediction_confidence_sum")[1].splitlines()[0]


async def test_a_row_the_database_refuses_costs_only_itself(tmp_path) -> None:
    metrics = ApiMetrics()
    database = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/r.db")
    predlog = PredictionLog(database, metrics, flush_interval_s=0.05)
    bad = _record(0)
    bad.confidence = float("nan")  # SQLite stores NaN as NULL: refused by NOT NULL (MySQL refuses NaN itself)
    for record in (bad, *(_record(i) for i in range(1, 6))):
        predlog.record(record)
    task = asyncio.create_task(predlog.run())
    try:

        async def settled() -> bool:
            return metrics.log_written._value.get() == 5

        await until(settled)
        predlog.record(_record(6))  # and the log goes on writing

        async def more() -> bool:
            return metrics.log_written._value.get() == 6

        await until(more)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert metrics.log_dropped.labels(reason="rejected")._value.get() == 1
    assert predlog.healthy and not predlog.pending(_record(0).id)


async def test_uploads_are_stored_only_when_enabled(tmp_path) -> None:
    settings = ApiSettings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/api.db"),
        store=ObjectStoreSettings(url=str(tmp_path / "objects")),
        prediction_log=True,
        store_uploads=True,
        prediction_log_flush_interval_s=0.05,
    )
    async with serving(settings) as (_, client):
        answer = (await client.post("/predict", files={"file": ("g.jpg", GRASS, "image/jpeg")})).json()

        async def logged() -> bool:
            return len(await rows(settings)) == 1

        await until(logged)
    (row,) = await rows(settings)
    assert row.id == answer["id"]
    assert re.fullmatch(rf"uploads/\d{{4}}/\d\d/\d\d/{row.id}\.jpg", row.image_key)
    assert (tmp_path / "objects" / row.image_key).read_bytes() == GRASS
    assert row.image_sha256 == hashlib.sha256(GRASS).hexdigest()


def _record(i: int, image: bytes | None = None) -> Record:
    descriptors = dict.fromkeys(DESCRIPTOR_COLUMNS, 0.5)
    return Record(f"{i:032x}", "predict", "m", "1", "grass", 0.9, 12.0, descriptors, image, "JPEG" if image else None)


async def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path) -> None:
    metrics = ApiMetrics()
    database = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/q.db")
    predlog = PredictionLog(database, metrics, max_queue=5, max_upload_bytes_queued=10, flush_interval_s=60)
    for i in range(8):
        predlog.record(_record(i, image=b"12345678" if i < 2 else None))  # the second image is over the budget
    assert metrics.log_dropped.labels(reason="queue_full")._value.get() == 3
    assert metrics.uploads_dropped.labels(reason="queue_full")._value.get() == 1
    assert metrics.log_queue_depth._value.get() == 5
    task = asyncio.create_task(predlog.run())
    try:

        async def written() -> bool:
            return metrics.log_written._value.get() == 5

        predlog._wake.set()
        await until(written)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with open_database(database) as sessions, sessions() as session:
        assert await session.scalar(select(func.count()).select_from(PredictionRow)) == 5


async def test_shutdown_writes_what_is_queued(tmp_path) -> None:
    metrics = ApiMetrics()
    database = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/s.db")
    predlog = PredictionLog(database, metrics, flush_interval_s=60)
    task = asyncio.create_task(predlog.run())

    async def healthy() -> bool:
        return predlog.healthy

    predlog._wake.set()
    await until(healthy)
    for i in range(7):
        predlog.record(_record(i))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with open_database(database) as sessions, sessions() as session:
        assert await session.scalar(select(func.count()).select_from(PredictionRow)) == 7


async def test_a_database_down_at_start_does_not_stop_serving(api_settings: ApiSettings) -> None:
    from tests.servers import free_port

    down = DatabaseSettings(url=f"mysql+asyncmy://root@127.0.0.1:{free_port()}/nothing")  # nobody listens
    async with serving(api_settings.model_copy(update={"database": down})) as (_, client):
        answers = [await client.post("/predict", files={"file": ("g.jpg", GRASS, "image/jpeg")}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert (await client.get("/health/ready")).status_code == 200  # the log is not a readiness dependency
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "prediction_log_healthy") == 0
        assert metric(metrics, "prediction_log_written_total") == 0
        assert metric(metrics, "prediction_log_dropped_total", reason="queue_full") == 0  # kept for later
        feedback = await client.post("/feedback", json={"prediction_id": answers[0].json()["id"], "label": "grass"})
        assert feedback.status_code == 503
