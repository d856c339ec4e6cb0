"""The prediction log and input drift on the real stack: the real champion served by the real API process,
its log in a MariaDB server that is stopped and started under load, drift measured on real photos."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pymysql
from PIL import Image, ImageEnhance

from shared.drift import ALERTING_FEATURES, PSI_THRESHOLD
from tests.api.conftest import eventually
from tests.api.process import api_process
from tests.api.test_prediction_log import metric
from tests.conftest import ARTIFACTS, api_env
from tests.servers import PrivateMariaDB


def photos(data_dir: Path, label: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_dir / label).glob("*.jpg"))]


def darkened(data: bytes, factor: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    ImageEnhance.Brightness(Image.open(io.BytesIO(data)).convert("RGB")).enhance(factor).save(buffer, "JPEG")
    return buffer.getvalue()


async def send(url: str, images: list[bytes], concurrency: int = 8) -> list[httpx.Response]:
    """POST every image to /predict with ``concurrency`` clients; all responses, in order."""
    results: list[httpx.Response | None] = [None] * len(images)
    queue = list(enumerate(images))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while queue:
                i, data = queue.pop()
                results[i] = await client.post("/predict", files={"file": (f"{i}.jpg", data, "image/jpeg")})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results  # type: ignore[return-value]


def count_rows(db: PrivateMariaDB, ids: list[str] | None = None) -> int:
    conn = pymysql.connect(host="127.0.0.1", port=db.port, user="root", password="", database="dg")
    try:
        with conn.cursor() as cursor:
            if ids is None:
                cursor.execute("SELECT COUNT(*) FROM predictions")
            else:
                cursor.execute("SELECT COUNT(*) FROM predictions WHERE id IN %s", (ids,))
            return cursor.fetchone()[0]
    except pymysql.err.ProgrammingError:  # the table is not there yet
        return 0
    finally:
        conn.close()


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/metrics")).text


async def test_predictions_are_logged_under_load_through_a_database_outage(
    champion_registry, data_dir: Path, tmp_path: Path
) -> None:
    db = PrivateMariaDB(tmp_path / "mariadb", ARTIFACTS / "private-mariadb.log").start()
    queue = 40  # small, so that the outage outlasts the queue
    env = api_env(
        champion_registry,
        DATABASE_URL=db.url,
        API_PREDICTION_LOG_MAX_QUEUE=str(queue),
        API_PREDICTION_LOG_FLUSH_INTERVAL_S="0.2",
    )
    images = photos(data_dir, "grass")[:50] + photos(data_dir, "dandelion")[:50]
    try:
        with api_process(env, ARTIFACTS / "api-db-outage.log") as url:
            before = await send(url, images[:60])
            await eventually(lambda: count_rows(db) == 60, 60, 0.25)

            db.stop()  # halfway: the database goes away while requests keep coming
            during = await send(url, images * 2)
            metrics = await scrape(url)
            assert metric(metrics, "prediction_log_healthy") == 0
            assert metric(metrics, "prediction_log_dropped_total", reason="queue_full") > 0

            db.start()  # back: logging resumes by itself (within its retry backoff) and drains the queue
            await eventually(
                lambda: metric(httpx.get(f"{url}/metrics").text, "prediction_log_queue_depth") == 0, 60, 0.25
            )
            after = await send(url, images[:40])
            after_ids = [r.json()["id"] for r in after]
            await eventually(lambda: count_rows(db, after_ids) == len(after_ids), 60, 0.25)  # every one of them
            metrics = await scrape(url)
            written = metric(metrics, "prediction_log_written_total")
            dropped = metric(metrics, "prediction_log_dropped_total", reason="queue_full")
            assert metric(metrics, "prediction_log_healthy") == 1
            total = count_rows(db)
    finally:
        db.stop()
    responses = before + during + after
    assert [r.status_code for r in responses] == [200] * len(responses)  # not one request failed or waited on it
    print(f"\n{len(responses)} requests: {written:.0f} logged, {dropped:.0f} dropped during the outage")
    assert total == written  # nothing written twice (a retried batch) and nothing counted that was not
    assert written + dropped == len(responses)  # every prediction is either in the table or counted as dropped


async def test_darkened_grass_moves_the_drift_gauge_and_normal_grass_does_not(champion_registry, data_dir) -> None:
    grass = photos(data_dir, "grass")
    env = api_env(champion_registry, API_DRIFT_WINDOW=str(len(grass)), API_DRIFT_MIN_SAMPLES="100")
    with api_process(env, ARTIFACTS / "api-drift.log") as url:
        assert all(r.status_code == 200 for r in await send(url, grass))
        normal = await scrape(url)
        assert all(r.status_code == 200 for r in await send(url, [darkened(p) for p in grass]))
        dark = await scrape(url)
    normal_psi = {f: metric(normal, "model_input_drift_psi", feature=f) for f in ALERTING_FEATURES}
    dark_psi = {f: metric(dark, "model_input_drift_psi", feature=f) for f in ALERTING_FEATURES}
    print(f"\nworst PSI: normal grass {max(normal_psi.values()):.3f}, darkened grass {max(dark_psi.values()):.3f}")
    assert max(normal_psi.values()) < PSI_THRESHOLD, normal_psi
    assert dark_psi["hsv_v_mean"] > PSI_THRESHOLD, dark_psi
    assert max(dark_psi.values()) > 4 * max(normal_psi.values())
