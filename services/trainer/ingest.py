"""Ingest labelled photos into the object store + ``images`` table: from an HTTP base URL, a local folder, or
production uploads that users labelled through ``POST /feedback``.

Every file is validated by the shared preprocessing, content-hashed, stored as ``raw/{label}/{sha256}.{ext}``
and only then recorded as a row. Known hashes are skipped, so a second run writes nothing. Download
problems are counted per file; an object store or database failure stops the run (a rerun completes it).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from services.trainer.features import FEEDBACK_SOURCE_PREFIX
from services.trainer.settings import TrainerSettings
from shared import images
from shared.db import open_database
from shared.labels import LABELS
from shared.storage import ObjectStore, ObjectStoreError, open_store
from shared.tables import FeedbackRow, ImageRow, PredictionRow

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class SourceError(RuntimeError):
    """The source cannot be read at all, or holds no image."""


@dataclass(frozen=True, slots=True)
class Candidate:
    label: str
    location: str
    """Where the reader fetches the file from."""
    origin: str | None = None
    """What the ``images`` row records as its source, when not ``location`` (``feedback:{prediction_id}``)."""


@dataclass
class IngestReport:
    new: int = 0
    duplicate: int = 0
    missing: int = 0
    failed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    new_by_label: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    last_failure: str = ""

    @property
    def seen(self) -> int:
        return self.new + self.duplicate + sum(self.rejected.values())

    def summary(self) -> str:
        rejected = f"{sum(self.rejected.values())} rejected"
        if self.rejected:
            rejected += f" ({', '.join(f'{n} {reason}' for reason, n in sorted(self.rejected.items()))})"
        return (
            f"ingest: {self.new} new, {self.duplicate} already stored, {rejected}, "
            f"{self.missing} missing, {self.failed} failed ({self.seconds:.1f} s)"
        )


@dataclass
class FeedbackReport(IngestReport):
    """An ingest of labelled production uploads, with what the counts alone would not explain."""

    feedback: int = 0
    """Feedback rows in the database."""
    not_stored: int = 0
    """Feedback rows whose prediction has no kept upload (``API_STORE_UPLOADS`` off, an ``/invocations`` array,
    or a failed upload): nothing to train on."""
    conflicts: int = 0
    """Duplicates whose feedback label differs from the label already recorded for the image (kept)."""

    def summary(self) -> str:
        line = super().summary().replace("ingest:", "ingest (feedback):", 1)
        notes = [f"{self.feedback} feedback row{'' if self.feedback == 1 else 's'}"]
        if self.not_stored:
            notes.append(
                f"{self.not_stored} without a stored image (API_STORE_UPLOADS off, an /invocations input, "
                "or the upload failed to store)"
            )
        if self.conflicts:
            notes.append(f"{self.conflicts} disagree with the label already recorded for the same image (kept)")
        return f"{line}; {', '.join(notes)}"


class _Missing(Exception):
    """The source has no file at this location (HTTP 404): tolerated, counted."""


class _FetchFailed(Exception):
    """The file could not be fetched after retries."""


class FolderSource:
    """``root/{label}/*.jpg``: one subfolder per label; other folders are ignored."""

    def __init__(self, root: Path, per_class: int | None) -> None:
        self.root = root
        self.per_class = per_class

    def candidates(self) -> list[Candidate]:
        if not self.root.is_dir():
            raise SourceError(f"source folder {self.root} does not exist")
        found: list[Candidate] = []
        for label in LABELS:
            folder = self.root / label
            files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            found.extend(Candidate(label, str(p.resolve())) for p in files[: self.per_class])
        if not found:
            raise SourceError(f"source folder {self.root} has no images under {'/, '.join(LABELS)}/")
        return found

    async def fetch(self, candidate: Candidate) -> bytes:
        return await asyncio.to_thread(Path(candidate.location).read_bytes)

    async def close(self) -> None:
        pass


class HttpSource:
    """``{base}/{label}/{i:08d}.jpg`` for i < per_class, fetched with bounded retries and backoff."""

    def __init__(self, base: str, per_class: int, settings: TrainerSettings) -> None:
        self.base = base.rstrip("/")
        self.per_class = per_class
        self.attempts = settings.download_attempts
        self.client = httpx.AsyncClient(
            timeout=settings.download_timeout_s,
            follow_redirects=True,
            limits=httpx.Limits(max_connections=settings.download_concurrency),
            headers={"User-Agent": "dandelion-grass-trainer"},
        )

    def candidates(self) -> list[Candidate]:
        return [Candidate(label, f"{self.base}/{label}/{i:08d}.jpg") for label in LABELS for i in range(self.per_class)]

    async def fetch(self, candidate: Candidate) -> bytes:
        delay = 0.25
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self.client.get(candidate.location)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code == 404:
                    raise _Missing(candidate.location)
                if response.is_success:
                    return response.content
                problem = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUSES:
                    break
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        raise _FetchFailed(f"{candidate.location}: {problem}")

    async def close(self) -> None:
        await self.client.aclose()


class FeedbackSource:
    """Uploads the API kept in the object store (``uploads/...``) whose prediction got a feedback label."""

    def __init__(self, store: ObjectStore, candidates: list[Candidate]) -> None:
        self.store = store
        self._candidates = candidates

    def candidates(self) -> list[Candidate]:
        return self._candidates

    async def fetch(self, candidate: Candidate) -> bytes:
        try:
            return await self.store.get(candidate.location)
        except ObjectStoreError:
            # Gone (an expiry rule on uploads/, a manual clean-up) is counted; an unreachable store is fatal.
            if not await self.store.exists(candidate.location):
                raise _Missing(candidate.location) from None
            raise

    async def close(self) -> None:
        pass


Reader = FolderSource | HttpSource | FeedbackSource


def open_source(source: str, per_class: int, settings: TrainerSettings) -> FolderSource | HttpSource:
    if source.startswith(("http://", "https://")):
        return HttpSource(source, per_class, settings)
    return FolderSource(Path(source).expanduser(), per_class)


async def ingest(
    settings: TrainerSettings,
    source: str | None = None,
    per_class: int | None = None,
    *,
    progress: bool = True,
    on_stored: Callable[[ImageRow], None] | None = None,
) -> IngestReport:
    """Ingest ``source`` (default: the configured data source); raises :class:`SourceError` if it is unusable."""
    source = source or settings.data_source
    reader = open_source(source, per_class or settings.per_class, settings)
    report = IngestReport()
    started = time.perf_counter()
    try:
        candidates = reader.candidates()
        if isinstance(reader, HttpSource):
            await _probe(reader, candidates[0])
        async with open_store(settings.store) as store, open_database(settings.database) as sessions:
            async with sessions() as session:
                known = set((await session.scalars(select(ImageRow.sha256))).all())
                if isinstance(reader, HttpSource):
                    # Files at an index URL do not change: one already ingested is not downloaded again, so the
                    # 6-hourly `run --if-needed` costs a few requests (the missing indices), not the data set.
                    ingested = set((await session.scalars(select(ImageRow.source))).all())
                    report.duplicate += sum(c.location in ingested for c in candidates)
                    candidates = [c for c in candidates if c.location not in ingested]
            await _ingest_all(candidates, reader, store, sessions, known, report, settings, progress, on_stored)
    finally:
        await reader.close()
        report.seconds = time.perf_counter() - started
    if report.seen == 0:
        if report.failed:
            raise SourceError(
                f"source {source} is unreachable: {report.failed} downloads failed ({report.last_failure})"
            )
        raise SourceError(f"source {source} holds no images ({report.missing} missing)")
    return report


async def ingest_feedback(
    settings: TrainerSettings,
    *,
    progress: bool = True,
    on_stored: Callable[[ImageRow], None] | None = None,
) -> FeedbackReport:
    """Ingest every kept upload that has feedback, under the feedback's label; ``source`` is ``feedback:{id}``.

    No feedback at all is not an error (a scheduled run must not fail because nobody answered). An upload
    whose recorded hash is already known is counted as a duplicate without being downloaded again, so
    reruns stay cheap however much feedback accumulates. When one image got several feedback rows, the
    latest one wins.
    """
    report = FeedbackReport()
    started = time.perf_counter()
    try:
        async with open_store(settings.store) as store, open_database(settings.database) as sessions:
            async with sessions() as session:
                labels_by_hash = dict((await session.execute(select(ImageRow.sha256, ImageRow.label))).all())
                report.feedback = await session.scalar(select(func.count()).select_from(FeedbackRow)) or 0
                stored = (
                    await session.execute(
                        select(
                            FeedbackRow.prediction_id,
                            FeedbackRow.label,
                            PredictionRow.image_key,
                            PredictionRow.image_sha256,
                        )
                        .join(PredictionRow, PredictionRow.id == FeedbackRow.prediction_id)
                        .where(PredictionRow.image_key.is_not(None))
                        .order_by(FeedbackRow.created_at, FeedbackRow.prediction_id)
                    )
                ).all()
            report.not_stored = report.feedback - len(stored)
            latest: dict[str, Candidate] = {}  # by image hash (or key when the hash is unknown); later wins
            for prediction_id, label, key, recorded_sha256 in stored:
                if label not in LABELS:
                    report.rejected["unknown_label"] += 1
                    continue
                identity = recorded_sha256 or key
                report.duplicate += identity in latest  # the same image labelled again: counted once
                latest[identity] = Candidate(label, key, f"{FEEDBACK_SOURCE_PREFIX}{prediction_id}")
            candidates: list[Candidate] = []
            for sha256, candidate in latest.items():
                if sha256 in labels_by_hash:
                    report.duplicate += 1
                    report.conflicts += labels_by_hash[sha256] != candidate.label
                else:
                    candidates.append(candidate)
            reader = FeedbackSource(store, candidates)
            await _ingest_all(
                candidates, reader, store, sessions, set(labels_by_hash), report, settings, progress, on_stored
            )
    finally:
        report.seconds = time.perf_counter() - started
    return report


async def _ingest_all(
    candidates: list[Candidate],
    reader: Reader,
    store: ObjectStore,
    sessions,
    known: set[str],
    report: IngestReport,
    settings: TrainerSettings,
    progress: bool,
    on_stored: Callable[[ImageRow], None] | None,
) -> None:
    bar = tqdm(total=len(candidates), desc="ingest", unit="img", disable=not progress, file=sys.stderr)
    limit = asyncio.Semaphore(settings.download_concurrency)

    async def one(candidate: Candidate) -> None:
        async with limit:
            await _ingest_one(candidate, reader, store, sessions, known, report, on_stored)
        bar.update()

    try:
        async with asyncio.TaskGroup() as group:
            for candidate in candidates:
                group.create_task(one(candidate))
    except* Exception as errors:
        # The first store/database failure is the one to report; the rest are its echoes.
        raise errors.exceptions[0] from None
    finally:
        bar.close()


async def _probe(reader: HttpSource, first: Candidate) -> None:
    """Fail fast, with one clear line, when the base URL cannot be reached at all."""
    try:
        await reader.client.head(first.location)
    except httpx.TransportError as exc:
        raise SourceError(f"source {reader.base} is unreachable: {type(exc).__name__}: {exc}") from None


async def _ingest_one(
    candidate: Candidate,
    reader: Reader,
    store: ObjectStore,
    sessions,
    known: set[str],
    report: IngestReport,
    on_stored: Callable[[ImageRow], None] | None,
) -> None:
    try:
        data = await reader.fetch(candidate)
    except _Missing:
        report.missing += 1
        return
    except (_FetchFailed, OSError) as exc:
        report.failed += 1
        report.last_failure = str(exc)
        return
    try:
        decoded = await asyncio.to_thread(images.decode, data)
    except images.ImageError as exc:
        report.rejected[exc.code] += 1
        return
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in known:
        report.duplicate += 1
        return
    known.add(sha256)
    key = f"raw/{candidate.label}/{sha256}.{images.EXTENSIONS.get(decoded.format, 'img')}"
    await store.put(key, data, content_type=images.MIME_TYPES.get(decoded.format, "application/octet-stream"))
    row = ImageRow(
        sha256=sha256,
        label=candidate.label,
        source=candidate.origin or candidate.location,
        object_key=key,
        width=decoded.width,
        height=decoded.height,
        byte_size=len(data),
    )
    async with sessions() as session:
        session.add(row)
        try:
            await session.commit()
        except IntegrityError:
            # Another ingest recorded the same image between our read of the known hashes and now.
            report.duplicate += 1
            return
    report.new += 1
    report.new_by_label[candidate.label] += 1
    if on_stored:
        on_stored(row)
