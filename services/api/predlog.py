"""The prediction log: every prediction recorded in the ``predictions`` table, off the request path.

:meth:`PredictionLog.record` only appends to a bounded in-memory queue; a background task writes the queue
in batches (one multi-row INSERT per batch) and, when ``API_STORE_UPLOADS`` is on, puts the uploaded files
in the object store first. Nothing here can block or fail a request:

- queue full (overload, or a long database outage) -> the record is dropped and counted;
- database down -> the batch in hand is retried with backoff while the queue buffers; once the queue is
  full, new records are dropped and counted; writing resumes by itself when the database is back;
- uploads beyond a byte budget, or an object store that refuses them -> the row is logged without its image
  and the image counted as dropped.

The database is the shared one (``DATABASE_URL``); the tables are created on the first connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, func, insert, select
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from services.api.metrics import ApiMetrics
from shared.db import create_engine, create_tables
from shared.feedback import DOMAIN_OUTCOMES, domain_outcome
from shared.images import EXTENSIONS, MIME_TYPES
from shared.labels import NEITHER
from shared.settings import DatabaseSettings, ObjectStoreSettings
from shared.storage import ObjectStore, open_store
from shared.tables import FeedbackRow, PredictionRow

TRUSTED_SENDER = "token"
"""``FeedbackRow.client`` of a label sent with the feedback token: trusted, however many come from one place."""

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, OSError, TimeoutError)
"""Failures that retrying can fix: the database is down, restarting, unreachable or hung."""


@dataclass(slots=True)
class Record:
    """One prediction, as the request saw it."""

    id: str
    endpoint: str
    model_name: str
    model_version: str
    label: str
    confidence: float
    latency_ms: float
    descriptors: dict[str, float]
    image: bytes | None = None
    """The uploaded file, kept only while it waits to be stored (``API_STORE_UPLOADS``)."""
    image_format: str | None = None
    domain_distance: float | None = None
    """The in-domain distance (None: the model that answered has no in-domain score)."""
    in_domain: bool | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def row(self, image_key: str | None, image_sha256: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "endpoint": self.endpoint,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "label": self.label,
            "confidence": self.confidence,
            "latency_ms": self.latency_ms,
            "image_sha256": image_sha256,
            "image_key": image_key,
            "domain_distance": self.domain_distance,
            "in_domain": self.in_domain,
            **self.descriptors,
        }


def upload_key(record: Record) -> str:
    ext = EXTENSIONS.get(record.image_format or "", "img")  # as ingest names files: the trainer reads these
    return f"uploads/{record.created_at:%Y/%m/%d}/{record.id}.{ext}"


class PredictionLog:
    def __init__(
        self,
        database: DatabaseSettings,
        metrics: ApiMetrics,
        *,
        store: ObjectStoreSettings | None = None,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_upload_bytes_queued: int = 64 * 1024 * 1024,
        retry_max_s: float = 30.0,
        accuracy_refresh_s: float = 30.0,
        db_timeout_s: float = 10.0,
        upload_timeout_s: float = 10.0,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.store_settings = store
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_upload_bytes_queued = max_upload_bytes_queued
        self.retry_max_s = retry_max_s
        self.accuracy_refresh_s = accuracy_refresh_s
        self._queue: deque[Record] = deque()
        self._queued_upload_bytes = 0
        self._wake = asyncio.Event()
        self._written = asyncio.Condition()
        self._stopping = False
        self._pending: set[str] = set()
        """Ids recorded here and not yet written (or dropped): feedback on them waits for the write."""
        self.db_timeout_s = db_timeout_s
        """Longest a database operation may take before it counts as an outage (a hung server, not a refusal)."""
        self.upload_timeout_s = upload_timeout_s
        # Created here, not in run(): a malformed DATABASE_URL or a missing driver stops the start, loudly.
        self.engine: AsyncEngine = create_engine(database)
        self.sessions: async_sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.healthy = False
        self.serving: tuple[str, str] | None = None
        """``(model name, version)`` whose live accuracy the gauge shows; set by the app on each swap."""

    @property
    def stores_uploads(self) -> bool:
        return self.store_settings is not None

    # -- request side: never blocks, never raises -------------------------------------------------

    def expect(self, prediction_id: str) -> None:
        """``prediction_id`` was answered and will be recorded in a moment: feedback on it waits for it."""
        self._pending.add(prediction_id)

    def forget(self, prediction_id: str) -> None:
        """An expected record that will not come after all."""
        self._pending.discard(prediction_id)

    def record(self, record: Record) -> None:
        if len(self._queue) >= self.max_queue:
            self.metrics.log_dropped.labels(reason="queue_full").inc()
            self._pending.discard(record.id)
            return
        if record.image is not None:
            if self._queued_upload_bytes + len(record.image) > self.max_upload_bytes_queued:
                record.image = None
                self.metrics.uploads_dropped.labels(reason="queue_full").inc()
            else:
                self._queued_upload_bytes += len(record.image)
        self._queue.append(record)
        self._pending.add(record.id)
        self.metrics.log_queue_depth.set(len(self._queue))
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def stop(self) -> None:
        """Ask :meth:`run` to write what it holds and return (the app awaits it, then cancels it if it hangs)."""
        self._stopping = True
        self._wake.set()

    def pending(self, prediction_id: str) -> bool:
        return prediction_id in self._pending

    async def wait_written(self, prediction_id: str, timeout_s: float) -> bool:
        """Wait until a recorded prediction has left the queue; True if it did within ``timeout_s``."""
        self._wake.set()
        async with self._written:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait_for(lambda: prediction_id not in self._pending), timeout_s)
        return prediction_id not in self._pending

    # -- background side ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: connect (with backoff), then write batches as they come. Cancel to stop (flushes first).

        Only :meth:`stop` (which lets it write what it holds, then return) or cancellation ends it: an unexpected
        error is logged, counted and retried after a pause, so a bug or a row the database refuses can cost some
        entries but never the log itself.
        """
        async with contextlib.AsyncExitStack() as stack:
            store = None
            if self.store_settings is not None:
                # The bucket is the trainer's; no call is made here, so a store that is down fails uploads only.
                store = await stack.enter_async_context(open_store(self.store_settings, create_bucket=False))
            try:
                await self._loop(store)
            finally:
                await self.engine.dispose()

    async def _loop(self, store: ObjectStore | None) -> None:
        delay = 0.5
        created = failing = False
        batch: list[dict[str, Any]] = []
        taken: list[Record] = []
        last_accuracy = float("-inf")
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._stopping and not batch and not self._queue:
                    return
                if not batch:
                    if not self._queue and created and not self._stopping:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                        self._wake.clear()  # a record arriving now is still seen: the queue is checked first
                    taken = self._take()
                    batch = await self._rows(taken, store) if taken else []
                try:
                    if not created:
                        await asyncio.wait_for(create_tables(self.engine), self.db_timeout_s)
                        created = True
                    written, rejected = await self._write(batch) if batch else (0, 0)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except TRANSIENT as exc:  # the database is down, unreachable or too slow: keep the batch, retry
                    if not failing:
                        log.warning("prediction log: the database is unavailable (%s); retrying", _short(exc))
                    failing = True
                    self._set_healthy(False)
                    if self._stopping:  # no waiting for the database at shutdown: count what is lost
                        self._count_lost(len(batch) + len(self._take(len(self._queue))))
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                except Exception:  # not the database's state but this code or these rows: never retry forever
                    log.exception("prediction log: %d predictions could not be written; dropping them", len(batch))
                    written, rejected = 0, len(batch)
                if failing:
                    log.info("prediction log: writing again")
                    failing = False
                self._set_healthy(True)
                delay = 0.5
                self.metrics.log_written.inc(written)
                if rejected:
                    self.metrics.log_dropped.labels(reason="rejected").inc(rejected)
                await self._done(taken)
                batch, taken = [], []
                if self.serving and loop.time() >= last_accuracy + self.accuracy_refresh_s:
                    last_accuracy = loop.time()
                    try:
                        await asyncio.wait_for(self._refresh_accuracy(), self.db_timeout_s)
                    except (asyncio.CancelledError, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # a gauge left stale, nothing more
                        log.warning("prediction log: live accuracy not refreshed (%s)", _short(exc))
        except asyncio.CancelledError:
            await self._flush_on_shutdown(batch, taken, created)
            raise

    async def _flush_on_shutdown(self, batch: list[dict[str, Any]], taken: list[Record], created: bool) -> None:
        """One last attempt at what is in hand and in the queue, bounded in time; whatever is lost is counted."""
        if not batch and taken:  # cancelled while storing the uploads: the rows, without their photos
            batch = [record.row(None, None) for record in taken]
        rest = self._take(len(self._queue))
        rows = batch + [record.row(None, None) for record in rest]  # no uploads now: that could take minutes
        written = 0
        if rows and created:
            with contextlib.suppress(Exception):
                written, _ = await asyncio.wait_for(self._write(rows), 5.0)
        self.metrics.log_written.inc(written)
        self._count_lost(len(rows) - written)

    def _count_lost(self, lost: int) -> None:
        if lost:
            self.metrics.log_dropped.labels(reason="shutdown").inc(lost)
            log.warning("prediction log: %d predictions not written at shutdown", lost)

    def _take(self, limit: int | None = None) -> list[Record]:
        taken = []
        while self._queue and len(taken) < (limit or self.batch_size):
            record = self._queue.popleft()
            if record.image is not None:
                self._queued_upload_bytes -= len(record.image)
            taken.append(record)
        self.metrics.log_queue_depth.set(len(self._queue))
        return taken

    async def _rows(self, records: list[Record], store: ObjectStore | None) -> list[dict[str, Any]]:
        """Rows for ``records``, after storing their uploads (concurrently; a failed upload loses only itself)."""

        async def one(record: Record) -> dict[str, Any]:
            if record.image is None or store is None:
                return record.row(None, None)
            data, record.image = record.image, None
            key, sha256 = upload_key(record), hashlib.sha256(data).hexdigest()
            try:
                content_type = MIME_TYPES.get(record.image_format or "", "application/octet-stream")
                await asyncio.wait_for(store.put(key, data, content_type), self.upload_timeout_s)
            except Exception as exc:
                self.metrics.uploads_dropped.labels(reason="store_error").inc()
                log.warning("prediction log: upload %s not stored (%s)", record.id, _short(exc))
                return record.row(None, sha256)
            return record.row(key, sha256)

        return list(await asyncio.gather(*(one(r) for r in records)))

    async def _write(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Insert ``rows``: ``(written, rejected)``. Connection trouble raises (the caller retries the batch); a
        batch the database refuses is written row by row, so one bad row costs only itself."""
        try:
            await asyncio.wait_for(self._insert(rows), self.db_timeout_s)
            return len(rows), 0
        except TRANSIENT:
            raise
        except DBAPIError as exc:
            log.warning("prediction log: a batch was refused (%s); writing its rows one by one", _short(exc))
        written = rejected = 0
        async with self.sessions() as session:
            ids = [r["id"] for r in rows]
            query = select(PredictionRow.id).where(PredictionRow.id.in_(ids))
            present = set((await asyncio.wait_for(session.scalars(query), self.db_timeout_s)).all())
        for row in rows:
            if row["id"] in present:  # a retried batch whose first attempt did commit
                written += 1
                continue
            try:
                await asyncio.wait_for(self._insert([row]), self.db_timeout_s)
                written += 1
            except TRANSIENT:
                raise
            except DBAPIError as exc:
                rejected += 1
                log.warning("prediction log: prediction %s refused (%s)", row["id"], _short(exc))
        return written, rejected

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(PredictionRow), rows)

    async def _done(self, records: list[Record]) -> None:
        if not records:
            return
        self._pending.difference_update(r.id for r in records)
        async with self._written:
            self._written.notify_all()

    async def _refresh_accuracy(self) -> None:
        """Live accuracy over the served version's dandelion/grass feedback, and what its feedback says about the
        in-domain verdicts (``neither`` labels included)."""
        name, version = self.serving
        query = (
            select(PredictionRow.label, PredictionRow.in_domain, FeedbackRow.label, func.count())
            .select_from(FeedbackRow)
            .join(PredictionRow, PredictionRow.id == FeedbackRow.prediction_id)
            .where(PredictionRow.model_name == name, PredictionRow.model_version == version)
            .group_by(PredictionRow.label, PredictionRow.in_domain, FeedbackRow.label)
        )
        async with self.sessions() as session:
            groups = (await session.execute(query)).all()
            # Who said so: one open-feedback client alone must not move the alert (token feedback is trusted).
            senders = (
                select(func.count(FeedbackRow.client.distinct()),
                       func.sum((FeedbackRow.client == TRUSTED_SENDER).cast(Integer)))
                .select_from(FeedbackRow)
                .join(PredictionRow, PredictionRow.id == FeedbackRow.prediction_id)
                .where(PredictionRow.model_name == name, PredictionRow.model_version == version,
                       FeedbackRow.label != NEITHER)
            )  # fmt: skip
            clients, trusted = (await session.execute(senders)).one()
        total = correct = 0
        outcomes = dict.fromkeys(DOMAIN_OUTCOMES, 0)
        for predicted, in_domain, told, count in groups:
            if told != NEITHER:
                total += count
                correct += count if predicted == told else 0
            if (outcome := domain_outcome(in_domain, told)) is not None:
                outcomes[outcome] += count
        self.metrics.live_accuracy_samples.set(total)
        self.metrics.live_accuracy_clients.set(float("inf") if trusted else (clients or 0))
        self.metrics.live_accuracy.set(correct / total if total else float("nan"))
        for outcome, count in outcomes.items():
            self.metrics.live_domain_feedback.labels(outcome=outcome).set(count)

    def _set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self.metrics.log_healthy.set(1 if healthy else 0)


def _short(exc: BaseException) -> str:
    detail = str(getattr(exc, "orig", None) or exc).splitlines()
    return f"{type(exc).__name__}: {detail[0][:200] if detail else ''}"
