"""The second hostile probe's LOW findings (issue #23), each against the app (fake model) as a client sends it."""

from __future__ import annotations

import gzip
import re

import httpx
import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager

from services.api import protocol
from services.api.errors import BadRequest
from tests.api.test_app import YELLOW

IMAGE = orjson.dumps({"inputs": np.full((1, 224, 224, 3), 0.5, np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
JSON = {"content-type": "application/json"}


def with_first_value(body: bytes, token: bytes) -> bytes:
    start = body.index(b"[[[[") + 4
    return body[:start] + token + body[body.index(b",", start) :]


@pytest.mark.parametrize("token", [b"true", b"false"])
async def test_a_json_boolean_is_not_a_pixel(client: httpx.AsyncClient, token: bytes) -> None:
    """``true`` was read as 1.0 (numpy's bool -> float), answering 200."""
    response = await client.post("/invocations", content=with_first_value(IMAGE, token), headers=JSON)
    assert response.status_code == 400, response.text
    assert "true and false" in response.json()["message"] or "numbers only" in response.json()["message"]
    with pytest.raises(BadRequest):  # the small-body path too
        protocol.parse_body(b'{"inputs": [[[[true, 0.5, 0.5]]]]}', max_instances=8)


async def test_compressed_or_labelled_compressed_bodies_answer_415(client: httpx.AsyncClient) -> None:
    """A gzip body answered "not valid UTF-8" (400); a plain body labelled gzip was read as plain (200)."""
    gzipped = gzip.compress(IMAGE)
    labelled = await client.post("/invocations", content=gzipped, headers={**JSON, "content-encoding": "gzip"})
    unlabelled = await client.post("/invocations", content=gzipped, headers=JSON)
    lying = await client.post("/invocations", content=IMAGE, headers={**JSON, "content-encoding": "gzip"})
    assert [r.status_code for r in (labelled, unlabelled, lying)] == [415] * 3, lying.text
    assert "uncompressed" in labelled.json()["message"] and "gzip" in unlabelled.json()["message"]
    plain = await client.post("/invocations", content=IMAGE, headers={**JSON, "content-encoding": "identity"})
    assert plain.status_code == 200, plain.text


async def raw(client: httpx.AsyncClient, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """One request as the server would hand it to the app, headers exactly as given (httpx adds a Host)."""
    app = client._transport.app  # type: ignore[attr-defined]
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 5555), "server": ("api", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent[0]


async def test_no_host_or_two_hosts_answer_400(client: httpx.AsyncClient) -> None:
    assert (await raw(client, "GET", "/model", []))["status"] == 400
    assert (await raw(client, "GET", "/model", [(b"host", b"a"), (b"host", b"b")]))["status"] == 400
    assert (await raw(client, "GET", "/model", [(b"host", b"api")]))["status"] == 200


async def test_invented_methods_add_no_metric_series(client: httpx.AsyncClient) -> None:
    """PROPFIND, MKCOL, QUERY... each added series per route; now they are all ``other`` (still a 405)."""
    for method in ("PROPFIND", "MKCOL", "QUERY", "X-RANDOM-1", "X-RANDOM-2"):
        assert (await client.request(method, "/predict")).status_code == 405
    text = (await client.get("/metrics")).text
    methods = set(re.findall(r'http_requests_total\{handler="/predict",method="([^"]+)"', text))
    assert methods == {"other"}, methods
    assert re.search(r'http_requests_total\{handler="/predict",method="other",status="4xx"\} 5\.0', text), text


async def test_allow_on_get_routes_names_head(client: httpx.AsyncClient) -> None:
    response = await client.post("/model")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD"}
    assert (await client.head("/model")).status_code == 200


async def test_json_errors_are_never_sniffed(client: httpx.AsyncClient) -> None:
    answers = [
        await client.post("/predict", files={"file": ("x.png", b"<html><script>alert(1)</script>")}),
        await client.get("/no-such-page"),
        await client.post("/invocations", content=b"{", headers=JSON),
        await client.post("/model"),
        await client.post("/predict", files={"file": ("y.png", YELLOW)}),
    ]
    assert [a.status_code for a in answers] == [400, 404, 400, 405, 200]
    assert all(a.headers.get("x-content-type-options") == "nosniff" for a in answers), [a.headers for a in answers]


async def test_live_accuracy_counts_distinct_clients_so_one_cannot_fire_the_alert(api_settings) -> None:
    """Open feedback: one address labelling every prediction wrong moved live accuracy to 0.0 alone, and the
    alert needed only 50 samples. Now the gauge beside it says how many clients sent the labels (the alert
    needs 3), and feedback sent with the token counts as trusted (+Inf)."""
    from services.api.app import create_app
    from tests.api.fakes import FakeSource
    from tests.api.test_prediction_log import DANDELION, metric, until, wait_ready

    settings = api_settings.model_copy(update={"prediction_log_flush_interval_s": 0.05})
    app = create_app(settings, source=FakeSource())
    async with LifespanManager(app) as manager:
        app.state.predlog.accuracy_refresh_s = 0.05

        def client_at(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=manager.app, client=(address, 4000))
            return httpx.AsyncClient(transport=transport, base_url="http://api")

        async def label(address: str, n: int) -> None:
            async with client_at(address) as c:
                await wait_ready(c)
                for _ in range(n):
                    pid = (await c.post("/predict", files={"file": ("d.png", DANDELION)})).json()["id"]
                    assert (await c.post("/feedback", json={"prediction_id": pid, "label": "grass"})).status_code == 201

        async def gauges(samples: int) -> tuple[float | None, float | None]:
            async with client_at("127.0.0.1") as c:
                text = (await c.get("/metrics")).text
            return metric(text, "model_live_accuracy_samples"), metric(text, "model_live_accuracy_clients")

        await label("203.0.113.7", 4)
        await until(lambda: _samples_are(gauges, 4))
        assert (await gauges(4))[1] == 1
        await label("203.0.113.8", 1)
        await label("203.0.113.9", 1)
        await until(lambda: _samples_are(gauges, 6))
        assert (await gauges(6))[1] == 3


async def _samples_are(gauges, n: int) -> bool:
    return (await gauges(n))[0] == n


async def test_token_feedback_counts_as_trusted(api_settings) -> None:
    from pydantic import SecretStr

    from services.api.app import create_app
    from tests.api.fakes import FakeSource
    from tests.api.test_prediction_log import DANDELION, metric, until, wait_ready

    token = "a-long-enough-test-token"
    settings = api_settings.model_copy(
        update={"prediction_log_flush_interval_s": 0.05, "feedback_token": SecretStr(token)}
    )
    app = create_app(settings, source=FakeSource())
    async with LifespanManager(app) as manager:
        app.state.predlog.accuracy_refresh_s = 0.05
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            await wait_ready(c)
            pid = (await c.post("/predict", files={"file": ("d.png", DANDELION)})).json()["id"]
            sent = await c.post(
                "/feedback", json={"prediction_id": pid, "label": "grass"}, headers={"authorization": f"Bearer {token}"}
            )
            assert sent.status_code == 201

            async def refreshed() -> bool:
                return metric((await c.get("/metrics")).text, "model_live_accuracy_samples") == 1

            await until(refreshed)
            assert metric((await c.get("/metrics")).text, "model_live_accuracy_clients") == float("inf")


async def test_kept_uploads_have_a_per_client_quota_and_a_total_cap(tmp_path) -> None:
    """With API_STORE_UPLOADS one client stored 181 MiB in 7 s. Now a client's uploads are kept up to its hourly
    share, the replica's up to its total; past them the prediction is logged without its photo, and counted."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings
    from shared.settings import DatabaseSettings, ObjectStoreSettings
    from tests.api.fakes import FakeSource
    from tests.api.test_prediction_log import GRASS, metric, rows, until, wait_ready

    settings = ApiSettings(
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/api.db"),
        store=ObjectStoreSettings(url=str(tmp_path / "objects")),
        prediction_log=True,
        store_uploads=True,
        prediction_log_flush_interval_s=0.05,
        store_uploads_client_bytes_per_hour=2 * len(GRASS),
        store_uploads_bytes_per_hour=3 * len(GRASS),
    )
    app = create_app(settings, source=FakeSource())
    async with LifespanManager(app) as manager:

        async def send(address: str, n: int) -> None:
            transport = httpx.ASGITransport(app=manager.app, client=(address, 4000))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
                await wait_ready(c)
                for _ in range(n):
                    assert (await c.post("/predict", files={"file": ("g.jpg", GRASS)})).status_code == 200

        await send("203.0.113.7", 3)  # its share is two photos
        await send("203.0.113.8", 2)  # the total is three: one more, then none

        async def logged() -> bool:
            return len(await rows(settings)) == 5

        await until(logged)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            text = (await c.get("/metrics")).text
    kept = [row.image_key for row in await rows(settings) if row.image_key]
    assert len(kept) == 3, kept
    assert len(list((tmp_path / "objects").rglob("*.jpg"))) == 3
    assert metric(text, "prediction_log_uploads_dropped_total", reason="quota") == 2


class Gate:
    """Stands in for the fake model's lock: says when a forward pass has begun, holds it until opened."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Event()
        self.opened = threading.Event()

    def __enter__(self) -> None:
        self.entered.set()
        self.opened.wait(30)

    def __exit__(self, *exc: object) -> None:
        return None


async def test_queued_work_of_a_client_that_hung_up_is_dropped(api_settings) -> None:
    """A request waiting for the model whose client hangs up is cancelled: it never reaches a forward pass, is
    not counted as served, and is metered as 499. Before, it was classified and counted 2xx for nobody."""
    import asyncio

    from services.api.app import create_app
    from tests.api.conftest import eventually
    from tests.api.fakes import FakeSource
    from tests.api.test_prediction_log import metric, wait_ready

    source = FakeSource()
    app = create_app(api_settings.model_copy(update={"max_batch_size": 1}), source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            await wait_ready(c)
            gate = source.lock = Gate()
            try:
                first = asyncio.create_task(c.post("/predict", files={"file": ("a.png", YELLOW)}))
                await eventually(gate.entered.is_set)  # the first is in the forward pass, held there
                hang_up = asyncio.Event()
                messages = [{"type": "http.request", "body": IMAGE, "more_body": False}]

                async def receive() -> dict:
                    if messages:
                        return messages.pop(0)
                    await hang_up.wait()
                    return {"type": "http.disconnect"}

                sent: list[dict] = []

                async def send(message: dict) -> None:
                    sent.append(message)

                scope = {
                    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                    "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
                    "root_path": "", "client": ("127.0.0.1", 5555), "server": ("api", 80),
                    "headers": [(b"host", b"api"), (b"content-type", b"application/json")],
                }  # fmt: skip
                second = asyncio.create_task(manager.app(scope, receive, send))
                batcher = app.state.classifier.batcher
                await eventually(lambda: batcher._queue.qsize() >= 1)  # the second waits behind the first
                hang_up.set()
                await asyncio.wait_for(second, 10)
            finally:
                gate.opened.set()
            assert (await first).status_code == 200
            assert sent[0]["status"] == 499
            assert source.calls_per_batch == [1], source.calls_per_batch  # the first only
            text = (await c.get("/metrics")).text
    assert metric(text, "http_requests_total", handler="/invocations", method="POST", status="4xx") == 1
    assert metric(text, "http_requests_total", handler="/invocations", method="POST", status="2xx") is None
