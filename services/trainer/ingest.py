"""Ingest labelled photos from an HTTP base URL or a local folder into the object store + ``images`` table.

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
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from services.trainer.settings import TrainerSettings
from shared import images
from shared.db import open_database
from shared.labels import LABELS
from shared.storage import ObjectStore, open_store
from shared.tables import ImageRow

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class SourceError(RuntimeError):
    """The source cannot be read at all, or holds no image."""


@dataclass(frozen=True, slots=True)
class Candidate:
    label: str
    location: str


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
        rejected = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items())) or "0"
        return (
            f"ingest: {self.new} new, {self.duplicate} duplicate, rejected {rejected}, "
            f"{self.missing} missing, {self.failed} failed in {self.seconds:.1f} s"
        )


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


async def _probe(reader: HttpSource, first: Candidate) -> None:
    """Fail fast, with one clear line, when the base URL cannot be reached at all."""
    try:
        await reader.client.head(first.location)
    except httpx.TransportError as exc:
        raise SourceError(f"source {reader.base} is unreachable: {type(exc).__name__}: {exc}") from None


async def _ingest_one(
    candidate: Candidate,
    reader: FolderSource | HttpSource,
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
    key = f"raw/{candidate.label}/{sha256}.{EXTENSIONS.get(decoded.format, 'img')}"
    await store.put(key, data, content_type=MIME_TYPES.get(decoded.format, "application/octet-stream"))
    row = ImageRow(
        sha256=sha256,
        label=candidate.label,
        source=candidate.location,
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
