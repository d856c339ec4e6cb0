"""The real API process against a real MLflow server holding a model trained on the real photos,
compared with a real ``mlflow models serve`` on the same registered model."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import mlflow
import numpy as np
import orjson
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc.scoring_server.client import ScoringServerClient

from shared.images import preprocess
from tests.api.process import api_process
from tests.conftest import ARTIFACTS, FLOWERS_TRAINED, api_env
from tests.servers import VENV_BIN, TcpProxy, free_port, running

pytestmark = pytest.mark.slow


def photos(data_dir: Path, label: str, n: int, seed: int = 7) -> list[Path]:
    paths = sorted((data_dir / label).glob("*.jpg"))
    return random.Random(seed).sample(paths, n)


@pytest.fixture(scope="module")
def mlflow_serve(champion_registry) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**api_env(champion_registry), "MLFLOW_TRACKING_URI": champion_registry.tracking_uri}
    with running(
        [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{champion_registry.model_name}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        ready=lambda: httpx.get(f"{url}/ping", timeout=2).status_code == 200,
        log=ARTIFACTS / "mlflow-models-serve.log",
        env=env,
        timeout=180,
        what="mlflow models serve",
    ):
        yield url


def test_predict_real_photos_of_each_class(api: str, data_dir: Path) -> None:
    for label in ("dandelion", "grass"):
        answers = []
        for path in photos(data_dir, label, 12):
            response = httpx.post(f"{api}/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            assert response.status_code == 200, response.text
            answers.append(response.json())
        right = sum(a["label"] == label for a in answers)
        assert right >= 9, f"{label}: only {right}/12 right; the label order or the model is broken"
        for answer in answers:
            assert answer["model"] == {"name": "dandelion-grass-champion", "version": "1"}
            assert set(answer["probabilities"]) == {"dandelion", "grass"}
            assert abs(sum(answer["probabilities"].values()) - 1) < 1e-5


def other_images() -> dict[str, bytes]:
    """Things people send that are neither dandelions nor grass."""
    import io

    from PIL import Image, ImageDraw
    from skimage import data as samples

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG")
        return buffer.getvalue()

    receipt = Image.new("RGB", (360, 480), "white")
    draw = ImageDraw.Draw(receipt)
    for line in range(24):
        draw.text((16, 14 + 18 * line), f"ITEM {line:02d} ....... {line * 3.75:7.2f} EUR", fill="black")
    return {
        "receipt": png(receipt),
        "a cat": png(Image.fromarray(samples.chelsea()).crop((100, 20, 400, 300))),
        "a person": png(Image.fromarray(samples.astronaut()).crop((100, 0, 400, 300))),
        "a flat blue screen": png(Image.new("RGB", (400, 300), (20, 60, 200))),
    }


def test_the_real_champion_says_when_a_photo_is_neither(api: str, data_dir: Path) -> None:
    """Photos of both classes are in domain; other things are flagged, and still get a label (nothing hidden)."""
    real = photos(data_dir, "dandelion", 10, seed=11) + photos(data_dir, "grass", 10, seed=12)
    inside = []
    for path in real:
        answer = httpx.post(f"{api}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60).json()
        inside.append(answer["in_domain"])
    assert sum(inside) >= 18, f"{20 - sum(inside)} of 20 real photos flagged as neither dandelion nor grass"
    for name, data in other_images().items():
        answer = httpx.post(f"{api}/predict", files={"file": (f"{name}.png", data)}, timeout=60).json()
        assert answer["in_domain"] is False, (name, answer)
        assert answer["label"] in ("dandelion", "grass") and answer["domain_distance"] > 0
    # /invocations: MLflow's body, the verdicts in a header, in input order.
    blank = np.ones((1, 224, 224, 3), np.float32)
    x = np.concatenate([seed_inputs(data_dir, 1), blank])
    response = post(api, {"inputs": x})
    assert list(response.json()) == ["predictions"]
    assert response.headers["x-in-domain"].split(",")[2] == "false"


def unseen(folder: Path, n: int) -> list[Path]:
    """Photos of ``folder`` the real champion was not trained on (it saw the first FLOWERS_TRAINED by name)."""
    return sorted(folder.glob("*.jpg"))[FLOWERS_TRAINED:][::7][:n]


def test_the_real_champion_refuses_other_flowers_and_knows_dandelions_of_another_source(
    api: str, flowers_dir: Path, real_champion
) -> None:
    """Daisies, roses, sunflowers and tulips it was not trained on are flagged, as other flowers, about as often as
    the run's cross-validation said they would be (each kind within a binomial margin of its logged rate); the
    other source's dandelions (many seed heads) are dandelions."""
    _, result = real_champion
    caught, as_flower, expected = {}, {}, {}
    for kind in ("daisy", "rose", "sunflower", "tulip"):
        answers = [predict(api, path) for path in unseen(flowers_dir / kind, 12)]
        caught[kind] = sum(a["in_domain"] is False for a in answers)
        as_flower[kind] = sum(a["out_of_domain_reason"] == "looks_like_refused_kind" for a in answers)
        for answer in answers:
            assert answer["label"] in ("dandelion", "grass")  # nothing hidden
            assert (answer["out_of_domain_reason"] is None) is answer["in_domain"], answer
        rate = result.metrics[f"domain_caught_{kind}"]
        expected[kind] = round(rate * 12, 1)
        assert abs(caught[kind] - 12 * rate) <= 3 * (12 * rate * (1 - rate)) ** 0.5 + 1, (kind, caught, expected)
    assert sum(caught.values()) >= 0.6 * 48, (caught, expected)
    assert sum(as_flower.values()) >= 0.8 * sum(caught.values()), as_flower  # known as flowers, not as oddities
    dandelions = [predict(api, path) for path in unseen(flowers_dir / "dandelion", 20)]
    right = sum(a["label"] == "dandelion" and a["in_domain"] for a in dandelions)
    assert right >= 15, [(a["label"], a["in_domain"], a["out_of_domain_reason"]) for a in dandelions]


def predict(api: str, path: Path, **params: str) -> dict:
    response = httpx.post(
        f"{api}/predict", params=params, files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def yellow_cells(path: Path, grid: int) -> np.ndarray:
    """Share of strongly yellow pixels (dandelion heads) in each cell of a ``grid`` x ``grid`` split of what the
    model sees (the preprocessed 224 x 224 image)."""
    from PIL import Image

    x = preprocess(path.read_bytes())
    hsv = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).convert("HSV"), np.float32)
    hue, saturation, value = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    yellow = (hue > 40) & (hue < 70) & (saturation > 0.5) & (value > 0.5)
    side = 224 // grid
    cropped = yellow[: side * grid, : side * grid]
    return cropped.reshape(grid, side, grid, side).mean(axis=(1, 3))


def test_why_points_at_the_flowers(api: str, data_dir: Path) -> None:
    """For dandelion answers, the activation map's evidence sits on the yellow flower heads: the cells with the
    most yellow carry more evidence than the cells with none, on most photos with some of each."""
    checked = agreed = 0
    for path in sorted((data_dir / "dandelion").glob("*.jpg")):
        answer = predict(api, path, explain="true")
        explain = answer["explain"]
        grid = explain["grid"][0]
        assert explain["grid"] == [grid, grid] and explain["png"].startswith("data:image/png;base64,")
        assert explain["for"] == answer["label"]
        yellow = yellow_cells(path, grid)
        if answer["label"] != "dandelion" or not (yellow > 0.25).any() or not (yellow == 0).any():
            continue
        evidence = np.asarray(explain["evidence"])
        checked += 1
        agreed += evidence[yellow > 0.25].mean() > evidence[yellow == 0].mean()
        if checked == 30:
            break
    assert checked >= 20 and agreed >= 0.8 * checked, (checked, agreed)
    plain = predict(api, path)
    assert "explain" not in plain or plain["explain"] is None  # only when asked

    # A lawn has no one place that makes it grass: its evidence is spread, a dandelion's is gathered.
    def concentration(label: str) -> float:
        shares = []
        for path in sorted((data_dir / label).glob("*.jpg"))[:20]:
            answer = predict(api, path, explain="true")
            if answer["label"] == label:
                positive = np.clip(np.asarray(answer["explain"]["evidence"]).ravel(), 0, None)
                shares.append(np.sort(positive)[::-1][: positive.size // 10].sum() / max(positive.sum(), 1e-9))
        assert len(shares) >= 15, label
        return float(np.mean(shares))

    flower, lawn = concentration("dandelion"), concentration("grass")
    assert flower > lawn, (flower, lawn)  # the share of the evidence in the top tenth of the cells


def test_the_model_card_of_the_served_version(api: str, real_champion) -> None:
    _, result = real_champion
    response = httpx.get(f"{api}/model/card")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/markdown")
    card = response.text
    assert f"v{result.version}" in card and "daisy" in card and "flowers" in card


def test_model_endpoint_describes_the_champion(api: str, real_champion) -> None:
    _, result = real_champion
    info = httpx.get(f"{api}/model").json()
    assert info["version"] == result.version
    assert info["run_id"] == result.run_id
    assert info["labels"] == ["dandelion", "grass"]
    assert info["alias"] == "champion"
    assert info["input_shape"] == [-1, 224, 224, 3]


def seed_inputs(data_dir: Path, n_per_class: int) -> np.ndarray:
    paths = photos(data_dir, "dandelion", n_per_class, 1) + photos(data_dir, "grass", n_per_class, 2)
    return np.stack([preprocess(p.read_bytes()) for p in paths])


def post(url: str, payload: bytes | dict, content_type: str = "application/json") -> httpx.Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return httpx.post(f"{url}/invocations", content=body, headers={"content-type": content_type}, timeout=120)


def test_invocations_equal_mlflow_models_serve(api: str, mlflow_serve: str, data_dir: Path) -> None:
    x = seed_inputs(data_dir, 2)
    flat = x[0].reshape(-1)
    payloads = {
        "seed single": {"inputs": [x[0].tolist()]},
        "seed batch": {"inputs": x.tolist()},
        "instances": {"instances": x[:2].tolist()},
        "with params": {"inputs": x[:1].tolist(), "params": {"threshold": 0.5}},
    }
    for name, payload in payloads.items():
        ours, theirs = post(api, payload), post(mlflow_serve, payload)
        assert theirs.status_code == 200, (name, theirs.text[:300])
        assert ours.status_code == 200, (name, ours.text[:300])
        a, b = np.array(ours.json()["predictions"]), np.array(theirs.json()["predictions"])
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)

    # A frame with one flattened image per row is reshaped as MLflow reshapes it. mlflow models serve
    # itself needs longer than its 60 s timeout to parse 150,528 columns, so compare with `inputs`.
    frame = {"dataframe_split": {"columns": list(range(flat.size)), "data": [flat.tolist()]}}
    records = {"dataframe_records": [dict(zip(map(str, range(flat.size)), flat.tolist(), strict=True))]}
    expected = np.array(post(mlflow_serve, {"inputs": x[:1]}).json()["predictions"])
    for payload in (frame, records):
        response = post(api, payload)
        assert response.status_code == 200, response.text[:300]
        np.testing.assert_allclose(response.json()["predictions"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'{"nothing": 1}', "application/json"),
        (b'{"inputs": [[1.0, 2.0]]}', "application/json"),
        (b'{"inputs": [], "instances": []}', "application/json"),
        (b'{"inputs": [[[0.1, 0.2, 0.3]]]}', "application/json"),
        (b'{"inputs": [[[[0.1, 0.2, 0.3]]]]}', "application/json"),
        (b'{"inputs": null}', "application/json"),
        (b'{"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}', "application/json"),
        (b'{"dataframe_records": [{"image": [[[0.1, 0.2, 0.3]]]}]}', "application/json"),
        (b'{"inputs": [1]}', "application/json; charset=latin-1"),
        (b'{"inputs": [1]}', "application/json; format=pandas-split"),
        (b'{"inputs": [1]}', "application/xml"),
    ],
)
def test_errors_agree_with_mlflow_models_serve(api: str, mlflow_serve: str, body: bytes, content_type: str) -> None:
    ours, theirs = post(api, body, content_type), post(mlflow_serve, body, content_type)
    assert 400 <= theirs.status_code < 500, theirs.text[:200]
    assert ours.status_code == theirs.status_code, (ours.text[:200], theirs.text[:200])
    error = ours.json()
    assert set(error) == {"error_code", "message"}
    assert body.decode() not in error["message"]


def test_mlflow_scoring_client_unchanged(api: str, mlflow_serve: str, data_dir: Path) -> None:
    x = seed_inputs(data_dir, 1)
    results = {}
    for url in (api, mlflow_serve):
        parsed = urlparse(url)
        client = ScoringServerClient(parsed.hostname, parsed.port)
        client.wait_server_ready(timeout=30)
        assert client.get_version()
        results[url] = np.asarray(client.invoke(x).get_predictions(predictions_format="ndarray"))
    np.testing.assert_allclose(results[api], results[mlflow_serve], atol=1e-5, rtol=0)


def metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_move_with_traffic(api: str, data_dir: Path) -> None:
    before = httpx.get(f"{api}/metrics").text
    path = photos(data_dir, "grass", 1, 3)[0]
    for _ in range(3):
        assert httpx.post(f"{api}/predict", files={"file": (path.name, path.read_bytes())}).status_code == 200
    after = httpx.get(f"{api}/metrics").text
    assert metric(after, "model_predictions_total") == metric(before, "model_predictions_total") + 3
    assert metric(after, "model_inference_seconds_count") >= metric(before, "model_inference_seconds_count") + 3
    handler = 'http_requests_total{handler="/predict",method="POST",status="2xx"}'
    assert metric(after, handler) == metric(before, handler) + 3
    assert 'model_info{alias="champion",name="dandelion-grass-champion"' in after


SWAP_SLACK_S = 15.0
"""What a real swap may take beyond the poll interval: resolve the alias over REST, download the version's
artifacts from S3 and load its LiteRT export (about 1-3 s here), with room for a loaded machine."""


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll ``condition`` until true; the monotonic time it became true. Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.1f} s"
        time.sleep(0.05)
    return time.monotonic()


def test_new_champion_served_within_the_poll_interval(champion_registry, real_champion) -> None:
    """A second version promoted while the API runs is served within the poll interval (1 s) plus
    SWAP_SLACK_S, with zero failed requests around the swap. The backoff's bound (API_RETRY_MAX_S) is set far
    above both, so polling on the wrong setting cannot pass."""
    _, result = real_champion
    client = MlflowClient(champion_registry.tracking_uri)
    source = client.get_model_version(champion_registry.model_name, result.version).source
    name = "swap-test"
    mlflow.set_tracking_uri(champion_registry.tracking_uri)
    first = mlflow.register_model(source, name)
    client.set_registered_model_alias(name, "champion", first.version)
    registry = champion_registry.model_copy(update={"model_name": name})
    poll_s = 1.0
    threads = (os.cpu_count() or 1) + 1  # not the default (one per CPU): the log shows which was used
    env = api_env(registry, API_POLL_INTERVAL_S=str(poll_s), API_RETRY_MAX_S="300", API_INFERENCE_THREADS=str(threads))
    log = ARTIFACTS / "api-swap.log"
    logged_before = log.stat().st_size if log.exists() else 0
    with api_process(env, log) as url:
        seen: list[tuple[int, str]] = []
        stop = threading.Event()
        payload = orjson.dumps({"inputs": [np.full((224, 224, 3), 0.4, np.float32)]}, option=orjson.OPT_SERIALIZE_NUMPY)

        def traffic() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    r = http.post(f"{url}/invocations", content=payload, headers={"content-type": "application/json"})
                    seen.append((r.status_code, r.headers.get("x-model-version", "")))

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            wait_for(lambda: len(seen) >= 3, 60, "three answers from the first version")
            second = mlflow.register_model(source, name)
            client.set_registered_model_alias(name, "champion", second.version)
            promoted_at = time.monotonic()
            served_at = wait_for(
                lambda: httpx.get(f"{url}/model").json()["version"] == second.version,
                poll_s + SWAP_SLACK_S,
                "the new champion served",
            )
            after = len(seen)
            wait_for(lambda: len(seen) >= after + 3, 60, "three answers after the swap")
        finally:
            stop.set()
            worker.join()
    print(f"new champion served {served_at - promoted_at:.2f} s after promotion (poll interval {poll_s:g} s)")
    with log.open("rb") as lines:
        lines.seek(logged_before)
        loads = re.findall(rb"LiteRT with (\d+) threads", lines.read())
    assert loads == [str(threads).encode()] * 2, loads  # API_INFERENCE_THREADS, for both versions
    assert all(status == 200 for status, _ in seen), {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert versions[0] == first.version and versions[-1] == second.version
    assert versions == sorted(versions, key=int), "no response from the old model after the new one served"


def test_registry_down_at_start_then_back(champion_registry, mlflow_server: str) -> None:
    """Not ready while the registry is unreachable; ready by itself once it answers."""
    target = urlparse(mlflow_server)
    proxy = TcpProxy(target.hostname, target.port)
    registry = champion_registry.model_copy(update={"tracking_uri": f"http://127.0.0.1:{proxy.port}"})
    env = api_env(registry, API_RETRY_INITIAL_S="0.2", API_RETRY_MAX_S="1", API_POLL_INTERVAL_S="1")
    with api_process(env, ARTIFACTS / "api-registry-down.log", wait_ready=False) as url:
        assert httpx.get(f"{url}/health/live").status_code == 200
        deadline = time.monotonic() + 60
        while not (not_ready := httpx.get(f"{url}/health/ready")).json().get("last_error"):
            assert not_ready.status_code == 503
            assert time.monotonic() < deadline, "no load attempt failed within 60 s"
            time.sleep(0.2)
        assert not_ready.status_code == 503
        assert not_ready.json()["last_error"] == "registry_unreachable", not_ready.json()  # no host or port
        assert metric(httpx.get(f"{url}/metrics").text, "model_load_failures_total") >= 1
        proxy.start()
        try:
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "did not become ready after the registry came back"
                time.sleep(0.2)
            # Registry down again while serving: the current model keeps answering.
            failures = metric(httpx.get(f"{url}/metrics").text, "model_load_failures_total")
            proxy.stop()
            wait_for(  # two polls (1 s apart) failed while serving
                lambda: metric(httpx.get(f"{url}/metrics").text, "model_load_failures_total") >= failures + 2,
                60,
                "two failed polls",
            )
            x = {"inputs": [np.full((224, 224, 3), 0.5, np.float32)]}
            assert post(url, x).status_code == 200
            assert httpx.get(f"{url}/health/ready").status_code == 200
        finally:
            proxy.stop()


def test_sigterm_finishes_in_flight_requests_and_exits_zero(champion_registry, data_dir: Path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (ARTIFACTS / "api-sigterm.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **api_env(champion_registry)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.2)
        body = orjson.dumps({"inputs": seed_inputs(data_dir, 4)}, option=orjson.OPT_SERIALIZE_NUMPY)
        head = (
            f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        connections = []
        for _ in range(4):  # whole requests on the wire before the signal: in flight, not yet answered
            conn = socket.create_connection(("127.0.0.1", port), timeout=60)
            conn.sendall(head + body)
            connections.append(conn)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        statuses = []
        for conn in connections:
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            conn.close()
            statuses.append(int(answer.split(b" ", 2)[1]))
        assert statuses == [200, 200, 200, 200]
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
