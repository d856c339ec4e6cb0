"""Adaptive micro-batching: concurrent requests share forward passes.

While the model is busy, requests queue up; the next pass takes all of them (up to ``max_batch_size``
images). An idle server runs a lone request at once, so batching costs nothing at low load. With
``max_batch_size=1`` every request is its own pass. A failing pass is retried item by item, so one
bad item never fails its batch-mates. Every pass runs on one model, and each answer names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.api.errors import ModelNotReady, Overloaded
from services.api.metrics import ApiMetrics
from services.api.runtime import LoadedModel, ModelRuntime

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Item:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, LoadedModel]] = field(repr=False)


class Batcher:
    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: ApiMetrics,
        max_batch_size: int = 16,
        max_wait_s: float = 0.002,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queued_rows = 0
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop taking work, finish everything already queued, then stop the worker."""
        self._closing = True
        if self._worker is not None:
            await self._queue.join()
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    async def predict(self, x: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """Probabilities for ``x`` (``(n, H, W, 3)`` float32) and the model that computed them."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        if self.runtime.current is None:
            raise ModelNotReady(self._not_ready_message())
        future: asyncio.Future[tuple[np.ndarray, LoadedModel]] = asyncio.get_running_loop().create_future()
        self._queued_rows += len(x)
        self.metrics.queue_depth.set(self._queued_rows)
        self._queue.put_nowait(_Item(x, future))
        return await future

    def _not_ready_message(self) -> str:
        detail = f" (last error: {self.runtime.last_error_kind})" if self.runtime.last_error_kind else ""
        return f"no model is loaded yet{detail}"

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            rows = len(batch[0].x)
            rows = self._take_ready(batch, rows)
            if len(batch) > 1 and rows < self.max_batch_size and self.max_wait_s > 0:
                # Others are arriving at the same time: give stragglers a moment to join this pass.
                deadline = time.perf_counter() + self.max_wait_s
                while rows < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                    batch.append(item)
                    rows += len(item.x)
            self._queued_rows -= rows
            self.metrics.queue_depth.set(self._queued_rows)
            try:
                await self._process(batch)
            except Exception:  # the worker must outlive any batch, or every later request would hang
                log.exception("batch of %d failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("the model failed on this batch"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _take_ready(self, batch: list[_Item], rows: int) -> int:
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            batch.append(item)
            rows += len(item.x)
        return rows

    async def _process(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # a timed-out caller no longer waits
        if not live:
            return
        model = self.runtime.current
        if model is None:
            for item in live:
                item.future.set_exception(ModelNotReady(self._not_ready_message()))
            return
        x = live[0].x if len(live) == 1 else np.concatenate([item.x for item in live])
        try:
            probs = await self._forward(model, x)
        except Exception:
            if len(live) == 1:
                log.exception("forward pass failed")
                if not live[0].future.done():  # its caller may have timed out during the pass
                    live[0].future.set_exception(RuntimeError("the model failed on this input"))
                return
            for item in live:  # isolate the item that breaks the pass
                await self._process([item])
            return
        start = 0
        for item in live:
            end = start + len(item.x)
            if not item.future.done():
                item.future.set_result((probs[start:end], model))
            start = end

    async def _forward(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        probs = await loop.run_in_executor(self._executor, model.forward, x)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(x))
        return probs
