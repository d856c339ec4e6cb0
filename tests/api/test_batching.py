"""Micro-batching through the whole app: batch-mates get exactly their own answers, a failing item fails
alone, batching off still works, and shutdown drains what is queued."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator, Awaitable

import httpx
import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from PIL import Image

from services.api.app import create_app
from services.api.runtime import LoadedModel
from services.api.settings import ApiSettings
from tests.api.conftest import eventually, wait_ready
from tests.api.fakes import FakeSource

N = 12


class SlowSource(FakeSource):
    """The fake model, taking ``delay_s`` per pass and optionally held at a gate, so requests pile up."""

    def __init__(self, delay_s: float = 0.02) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def load(self, version: str, run_id: str) -> LoadedModel:
        model = super().load(version, run_id)
        fast = model.forward

        def forward(x: np.ndarray) -> np.ndarray:
            self.gate.wait(10)
            time.sleep(self.delay_s)
            return fast(x)

        return LoadedModel(
            name=model.name, version=version, alias=model.alias, run_id=run_id, labels=model.labels, forward=forward
        )


def images(n: int = N) -> list[np.ndarray]:
    """``n`` different images: from yellow (dandelion) to green (grass), each with its own noise."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        base = np.array([0.9, 0.85 - 0.05 * i, 0.1 + 0.03 * i], np.float32)
        out.append(np.clip(base + rng.normal(0, 0.05, (224, 224, 3)), 0, 1).astype(np.float32))
    return out


def as_png(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((x * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def invocation(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": x[np.newaxis]}, option=orjson.OPT_SERIALIZE_NUMPY)


async def invoke(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post("/invocations", content=body, headers={"content-type": "application/json"})


async def upload(client: httpx.AsyncClient, png: bytes) -> httpx.Response:
    return await client.post("/predict", files={"file": ("x.png", png, "image/png")})


@pytest.fixture
def source() -> SlowSource:
    return SlowSource()


@pytest.fixture
async def served(api_settings: ApiSettings, source: SlowSource) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app and a client to it; a 500 reaches the test as a response (as over a socket), not as a raise."""
    app = create_app(api_settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            yield app, client


async def all_queued_then_run(app: FastAPI, source: SlowSource, requests: list[Awaitable[httpx.Response]]):
    """Hold the model until every request waits in the batcher (one held in a pass, the rest queued), then let
    it run: the requests are concurrent by construction, not by the machine's timing."""
    batcher = app.state.classifier.batcher
    source.gate.clear()
    tasks = [asyncio.ensure_future(request) for request in requests]
    try:
        await eventually(lambda: batcher._queue._unfinished_tasks == len(tasks), timeout_s=30)
    finally:
        source.gate.set()
    return await asyncio.gather(*tasks)


async def test_concurrent_invocations_get_exactly_their_own_answers(served, source) -> None:
    app, client = served
    bodies = [invocation(x) for x in images()]
    alone = [(await invoke(client, body)).json()["predictions"] for body in bodies]
    assert set(source.calls_per_batch) == {1}
    source.calls_per_batch.clear()

    together = await all_queued_then_run(app, source, [invoke(client, body) for body in bodies])

    assert all(r.status_code == 200 for r in together), [r.text[:200] for r in together]
    assert [r.json()["predictions"] for r in together] == alone  # exactly, in the order asked
    assert max(source.calls_per_batch) > 1, source.calls_per_batch  # they did share passes
    assert sum(source.calls_per_batch) == N
    assert len({tuple(p[0]) for p in alone}) == N  # and the images really were all different


async def test_concurrent_uploads_get_exactly_their_own_answers(served, source) -> None:
    app, client = served
    pngs = [as_png(x) for x in images()]
    alone = [(await upload(client, png)).json()["probabilities"] for png in pngs]
    source.calls_per_batch.clear()

    together = await all_queued_then_run(app, source, [upload(client, png) for png in pngs])

    assert [r.json()["probabilities"] for r in together] == alone
    assert max(source.calls_per_batch) > 1, source.calls_per_batch


async def test_a_failing_item_does_not_fail_its_batch_mates(served, source) -> None:
    app, client = served
    xs = images()
    alone = [(await invoke(client, invocation(x))).json()["predictions"] for x in xs]
    poisoned = 5
    xs[poisoned] = xs[poisoned].copy()
    xs[poisoned][0, 0, 0] = source.poison_value = 0.123
    source.calls_per_batch.clear()

    responses = await all_queued_then_run(app, source, [invoke(client, invocation(x)) for x in xs])

    assert responses[poisoned].status_code == 500
    assert set(responses[poisoned].json()) == {"error_code", "message"}
    for i, response in enumerate(responses):
        if i != poisoned:
            assert response.status_code == 200, response.text[:200]
            assert response.json()["predictions"] == alone[i]
    assert max(source.calls_per_batch) > 1, "the poisoned item never shared a pass: nothing was tested"


@pytest.mark.parametrize("api_settings", [ApiSettings(max_batch_size=1, max_instances=8)])
async def test_batching_off_still_answers_everyone(served, source) -> None:
    app, client = served
    bodies = [invocation(x) for x in images()]
    alone = [(await invoke(client, body)).json()["predictions"] for body in bodies]
    source.calls_per_batch.clear()

    together = await all_queued_then_run(app, source, [invoke(client, body) for body in bodies])

    assert [r.json()["predictions"] for r in together] == alone
    assert source.calls_per_batch == [1] * N


async def test_batch_size_is_capped(api_settings: ApiSettings, source) -> None:
    settings = api_settings.model_copy(update={"max_batch_size": 4})
    app = create_app(settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            source.calls_per_batch.clear()
            responses = await all_queued_then_run(app, source, [invoke(client, invocation(x)) for x in images()])
    assert all(r.status_code == 200 for r in responses)
    assert max(source.calls_per_batch) == 4 and sum(source.calls_per_batch) == N


async def test_shutdown_drains_the_queue(api_settings: ApiSettings, source) -> None:
    """Requests already queued when shutdown starts are answered, not cancelled; later ones are refused."""
    app = create_app(api_settings, source=source)
    manager = LifespanManager(app, shutdown_timeout=20)
    await manager.__aenter__()
    transport = httpx.ASGITransport(app=manager.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        await wait_ready(client)
        batcher = app.state.classifier.batcher
        source.gate.clear()  # the model stalls: the first pass holds, everything else queues behind it
        first, *rest = images()
        pending = [asyncio.create_task(invoke(client, invocation(first)))]
        for _ in range(3000):  # up to 30 s on a loaded machine: until the batcher holds it in a pass
            if batcher._queue.qsize() == 0 and batcher._queue._unfinished_tasks == 1:
                break
            await asyncio.sleep(0.01)
        pending += [asyncio.create_task(invoke(client, invocation(x))) for x in rest]
        for _ in range(3000):
            if batcher._queue.qsize() == N - 1:
                break
            await asyncio.sleep(0.01)
        assert batcher._queue.qsize() == N - 1, "the requests did not queue behind the held pass"

        shutdown = asyncio.create_task(manager.__aexit__(None, None, None))
        await asyncio.sleep(0.1)
        assert not shutdown.done(), "shutdown did not wait for the queued requests"
        late = await invoke(client, invocation(images(1)[0]))
        source.gate.set()
        responses = await asyncio.gather(*pending)
        await shutdown

    assert [r.status_code for r in responses] == [200] * N, [r.text[:200] for r in responses]
    assert late.status_code == 503
    assert sum(source.calls_per_batch) == N


async def test_a_pass_failing_after_its_caller_gave_up_does_not_stop_the_batcher(api_settings, source) -> None:
    """The caller times out during the pass, then the pass fails: later requests are still served."""
    settings = api_settings.model_copy(update={"request_timeout_s": 0.5})
    source.delay_s = 1.0
    app = create_app(settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            await wait_ready(client)
            x = images(1)[0].copy()
            x[0, 0, 0] = source.poison_value = 0.123
            assert (await invoke(client, invocation(x))).status_code == 504
            batcher = app.state.classifier.batcher
            # The pass fails later, with nobody waiting for it: until then it holds the queue's one task.
            await eventually(lambda: source.calls_per_batch and batcher._queue._unfinished_tasks == 0)
            assert not app.state.classifier.batcher._worker.done()
            source.delay_s = 0.0
            after = await invoke(client, invocation(images(1)[0]))
    assert after.status_code == 200, after.text[:200]
