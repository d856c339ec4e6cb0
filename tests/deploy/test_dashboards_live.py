"""Every Grafana panel and every alert rule, evaluated by a real Prometheus scraping two real API
replicas (serving the real champion) while they take real traffic."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import orjson
import pytest
from prometheus_harness import PrometheusHarness, alert_exprs, dashboard_exprs

from tests.api.process import api_process
from tests.conftest import ARTIFACTS, api_env

pytestmark = pytest.mark.slow


def traffic(urls: list[str], data_dir: Path, seconds: float) -> dict[int, int]:
    """Mixed traffic on every replica: photos of both classes (each answer followed by feedback with the photo's
    true label), seed-style JSON, some bad requests."""
    photos = sorted((data_dir / "dandelion").glob("*.jpg"))[:10] + sorted((data_dir / "grass").glob("*.jpg"))[:10]
    seed = orjson.dumps({"inputs": [np.full((224, 224, 3), 0.3, np.float32)]}, option=orjson.OPT_SERIALIZE_NUMPY)
    statuses: dict[int, int] = {}
    rng = random.Random(0)
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            for url in urls:
                photo = rng.choice(photos)
                answer = client.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes())})
                truth = {"prediction_id": answer.json()["id"], "label": photo.parent.name}
                responses = [
                    answer,
                    client.post(f"{url}/feedback", json=truth),
                    client.post(f"{url}/invocations", content=seed, headers={"content-type": "application/json"}),
                    client.post(f"{url}/predict", files={"file": ("notes.jpg", b"not an image")}),
                    client.get(f"{url}/model"),
                ]
                for response in responses:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return statuses


def test_every_panel_returns_data_and_every_alert_evaluates(real_champion, data_dir: Path, mysql_url: str) -> None:
    settings, _ = real_champion
    # Both replicas log to one database, as in production; drift is exported early so its panel has data.
    env = api_env(settings.registry, DATABASE_URL=mysql_url, API_DRIFT_MIN_SAMPLES="5", API_LIVE_ACCURACY_REFRESH_S="1")
    with (
        api_process(env, ARTIFACTS / "api-replica-1.log") as first,
        api_process(env, ARTIFACTS / "api-replica-2.log") as second,
    ):
        targets = [urlparse(u).netloc for u in (first, second)]
        alerts = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus" / "alerts.yml"
        with PrometheusHarness(targets, rule_files=[alerts]) as prometheus:
            prometheus.wait_for_scrapes(2)
            background = threading.Thread(target=traffic, args=([first, second], data_dir, 4.0))
            background.start()
            statuses = traffic([first, second], data_dir, 8.0)
            background.join()
            assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0 and statuses.get(201, 0) > 0
            prometheus.wait_for_scrapes(3)

            empty = []
            for panel, expr in dashboard_exprs():
                result = prometheus.query(expr)  # raises on an expression Prometheus refuses
                if not result:
                    empty.append(panel)
            assert not empty, f"panels without data: {empty}"

            for _name, expr in alert_exprs():
                prometheus.query(expr)
            deadline = time.monotonic() + 30
            while not (rules := prometheus.rules()) or any(r.get("health") == "unknown" for r in rules):
                assert time.monotonic() < deadline, f"the alert rules were not all evaluated: {rules}"
                time.sleep(0.5)
            assert all(rule.get("health") == "ok" for rule in rules), [r for r in rules if r.get("health") != "ok"]
            firing = {rule["name"] for rule in rules if rule.get("state") == "firing"}
            assert not firing & {"ApiNoReadyReplica", "ApiReplicaDown", "ModelLoadFailures", "ApiHighErrorRate"}

            versions = prometheus.query("count by (version) (model_info == 1)")
            assert [v["metric"]["version"] for v in versions] == ["1"]
            assert prometheus.query("sum(model_ready)")[0]["value"][1] == "2"
