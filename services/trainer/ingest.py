"""Ingest labelled photos into the object store + ``images`` table, from the sources of :mod:`sources`.

Every file is validated by the shared preprocessing (the API's decoder and caps), described (the colour
statistics of the feature store), content-hashed, stored as ``raw/{label}/{sha256}.{ext}`` and only then recorded
as a row. Known hashes are skipped, so a second run writes nothing. Files are read by a bounded pool of workers;
rows are written by one writer in batches (one transaction each), so an embedded SQLite database never sees two
writers and a 100,000-photo folder costs a few hundred commits. Download problems are counted per file; an object
store or database failure stops the run (a rerun completes it).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from services.trainer.features import FEEDBACK_SOURCE_PREFIX
from services.trainer.settings import TrainerSettings
from services.trainer.sources import (
    Candidate,
    FeedbackSource,
    FetchFailed,
    FolderSource,
    HttpSource,
    Missing,
    Reader,
    SourceError,
    open_source,
    split_sources,
)
from shared import images
from shared.db import open_database
from shared.descriptors import COLOR_COLUMNS, load
from shared.labels import TRAINING_LABELS
from shared.storage import ObjectStore, open_store
from shared.tables import FeedbackRow, ImageRow, PredictionRow

__all__ = ["IngestReport", "SourceError", "ingest", "ingest_feedback"]

WRITE_INTERVAL_S = 1.0
"""A batch that has waited this long is written even if it is not full."""


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
    notes: list[str] = field(default_factory=list)
    """What a limit left out, or may have: said, never silent."""

    @property
    def seen(self) -> int:
        return self.new + self.duplicate + sum(self.rejected.values())

    def summary(self) -> str:
        return "\n".join([self.line(), *(f"  note: {note}" for note in self.notes)])

    def line(self) -> str:
        rejected = f"{sum(self.rejected.values())} rejected"
        if self.rejected:
            rejected += f" ({', '.join(f'{n} {reason}' for reason, n in sorted(self.rejected.items()))})"
        line = (
            f"ingest: {self.new} new, {self.duplicate} already stored, {rejected}, "
            f"{self.missing} missing, {self.failed} failed ({self.seconds:.1f} s)"
        )
        if self.new_by_label:
            line += "; new: " + ", ".join(f"{label} {n}" for label, n in sorted(self.new_by_label.items()))
        return line


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

    def line(self) -> str:
        line = super().line().replace("ingest:", "ingest (feedback):", 1)
        notes = [f"{self.feedback} feedback row{'' if self.feedback == 1 else 's'}"]
        if self.not_stored:
            notes.append(
                f"{self.not_stored} without a stored image (API_STORE_UPLOADS off, an /invocations input, "
                "or the upload failed to store)"
            )
        if self.conflicts:
            notes.append(f"{self.conflicts} disagree with the label already recorded for the same image (kept)")
        return f"{line}; {', '.join(notes)}"


async def ingest(
    settings: TrainerSettings,
    source: str | Iterable[str] | None = None,
    per_class: int | None = None,
    *,
    progress: bool = True,
    on_stored: Callable[[ImageRow], None] | None = None,
) -> IngestReport:
    """Ingest ``source`` (one ``[name=]location`` or several; default: the configured ``DATA_SOURCE``). Raises
    :class:`SourceError` if a source is unusable. ``per_class`` limits a folder only when given."""
    specs = split_sources(source) if isinstance(source, str) else list(source or split_sources(settings.data_source))
    report = IngestReport()
    started = time.perf_counter()
    readers = [
        open_source(
            spec,
            per_class,
            http_per_label=settings.per_class,
            attempts=settings.download_attempts,
            timeout_s=settings.download_timeout_s,
            concurrency=settings.download_concurrency,
        )
        for spec in specs
    ]
    try:
        async with open_store(settings.store) as store, open_database(settings.database) as sessions:
            async with sessions() as session:
                known = set((await session.scalars(select(ImageRow.sha256))).all())
                ingested = set((await session.scalars(select(ImageRow.source))).all())
            writer = _Writer(sessions, report, on_stored, settings.ingest_batch_rows)
            for reader in readers:
                candidates = reader.candidates()
                if isinstance(reader, HttpSource):
                    await reader.probe()
                    # Files at an index URL do not change: one already ingested is not downloaded again, so the
                    # 6-hourly `run --if-needed` costs a few requests (the missing indices), not the data set.
                    report.duplicate += sum(c.location in ingested for c in candidates)
                    candidates = [c for c in candidates if c.location not in ingested]
                await _ingest_all(candidates, reader, store, writer, known, report, settings, progress)
                _explain_limits(reader, report)
    finally:
        for reader in readers:
            await reader.close()
        report.seconds = time.perf_counter() - started
    if report.seen == 0:
        where = ", ".join(specs)
        if report.failed:
            raise SourceError(
                f"source {where} is unreachable: {report.failed} downloads failed ({report.last_failure})"
            )
        raise SourceError(f"source {where} holds no images ({report.missing} missing)")
    return report


def _explain_limits(reader: Reader, report: IngestReport) -> None:
    if isinstance(reader, FolderSource):
        for kind, n in sorted(reader.left_out.items()):
            report.notes.append(
                f"{reader.name}: {n} {kind} photos left out by the limit of {reader.per_label} per subfolder"
            )
    elif isinstance(reader, HttpSource):
        for label in sorted(reader.last_index_found):
            report.notes.append(
                f"{reader.name}: {label} has a photo at the last index tried ({reader.per_label - 1}): there may be "
                "more; raise --per-class (TRAINER_PER_CLASS) to look further"
            )


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
                if label not in TRAINING_LABELS:
                    report.rejected["unknown_label"] += 1
                    continue
                identity = recorded_sha256 or key
                report.duplicate += identity in latest  # the same image labelled again: counted once
                latest[identity] = Candidate(
                    label, key, "feedback" if label not in TRAINING_LABELS[:2] else label, "feedback",
                    f"{FEEDBACK_SOURCE_PREFIX}{prediction_id}",
                )  # fmt: skip
            candidates: list[Candidate] = []
            for sha256, candidate in latest.items():
                if sha256 in labels_by_hash:
                    report.duplicate += 1
                    report.conflicts += labels_by_hash[sha256] != candidate.label
                else:
                    candidates.append(candidate)
            reader = FeedbackSource(store, candidates)
            writer = _Writer(sessions, report, on_stored, settings.ingest_batch_rows)
            await _ingest_all(candidates, reader, store, writer, set(labels_by_hash), report, settings, progress)
    finally:
        report.seconds = time.perf_counter() - started
    return report


class _Writer:
    """The one writer of ``images`` rows: batches of up to ``batch`` rows (``TRAINER_INGEST_BATCH_ROWS``), one
    transaction each, written when full or :data:`WRITE_INTERVAL_S` after their first row.

    Rows arrive only after their object is stored. A batch that meets a row another ingest wrote meanwhile (a
    unique-hash conflict) is written again row by row, so only the duplicate is dropped (and counted).
    """

    def __init__(
        self, sessions, report: IngestReport, on_stored: Callable[[ImageRow], None] | None, batch: int
    ) -> None:
        self.sessions = sessions
        self.report = report
        self.on_stored = on_stored
        self.batch = batch
        self.queue: asyncio.Queue[ImageRow | None] = asyncio.Queue(maxsize=4 * batch)

    async def run(self) -> None:
        batch: list[ImageRow] = []
        done = False
        while not done:
            try:
                row = await asyncio.wait_for(self.queue.get(), WRITE_INTERVAL_S if batch else None)
            except TimeoutError:
                row = False
            if row is None:
                done = True
            elif row is not False:
                batch.append(row)
            if batch and (done or row is False or len(batch) >= self.batch):
                await self._write(batch)
                batch = []

    async def _write(self, batch: list[ImageRow]) -> None:
        try:
            async with self.sessions() as session:
                session.add_all(batch)
                await session.commit()
            written = batch
        except IntegrityError:
            written = []
            for row in batch:
                async with self.sessions() as session:
                    session.add(_copy(row))
                    try:
                        await session.commit()
                    except IntegrityError:
                        self.report.duplicate += 1  # another ingest recorded it between our read and now
                        continue
                written.append(row)
        for row in written:
            self.report.new += 1
            self.report.new_by_label[row.label] += 1
            if self.on_stored:
                self.on_stored(row)


def _copy(row: ImageRow) -> ImageRow:
    """A fresh, unattached row with the same values (the batch's rows belong to a rolled-back session)."""
    return ImageRow(
        **{column.key: getattr(row, column.key) for column in ImageRow.__table__.columns if column.key != "id"}
    )


async def _ingest_all(
    candidates: list[Candidate],
    reader: Reader,
    store: ObjectStore,
    writer: _Writer,
    known: set[str],
    report: IngestReport,
    settings: TrainerSettings,
    progress: bool,
) -> None:
    """Read, validate and store ``candidates`` with a bounded pool of workers; rows go to ``writer``."""
    bar = tqdm(total=len(candidates), desc="ingest", unit="img", disable=not progress, file=sys.stderr)
    pending = iter(candidates)

    async def worker() -> None:
        for candidate in pending:
            row = await _ingest_one(candidate, reader, store, known, report)
            if row is not None:
                await writer.queue.put(row)
            bar.update()

    async def read_all_then_stop() -> None:
        async with asyncio.TaskGroup() as readers:
            for _ in range(max(1, settings.download_concurrency)):
                readers.create_task(worker())
        await writer.queue.put(None)  # everything is queued: the writer writes the rest and stops

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(writer.run(), name="images-writer")
            group.create_task(read_all_then_stop())
    except* Exception as errors:
        # The first store/database failure is the one to report; the rest are its echoes.
        raise _first(errors) from None
    finally:
        bar.close()


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _ingest_one(
    candidate: Candidate, reader: Reader, store: ObjectStore, known: set[str], report: IngestReport
) -> ImageRow | None:
    """Fetch, validate, describe and store one file; its row (to be written), or None when there is none."""
    try:
        data = await reader.fetch(candidate)
    except Missing:
        report.missing += 1
        return None
    except (FetchFailed, OSError) as exc:
        report.failed += 1
        report.last_failure = str(exc)
        return None
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in known:  # stored already (so it decoded): not decoded again, the rerun of a big folder is a hash a file
        report.duplicate += 1
        return None
    try:
        loaded = await asyncio.to_thread(load, data)
        descriptors = await asyncio.to_thread(loaded.describe)
    except images.ImageError as exc:
        report.rejected[exc.code] += 1
        return None
    if sha256 in known:  # an identical file finished while this one was decoding
        report.duplicate += 1
        return None
    known.add(sha256)
    key = f"raw/{candidate.label}/{sha256}.{images.EXTENSIONS.get(loaded.format, 'img')}"
    await store.put(key, data, content_type=images.MIME_TYPES.get(loaded.format, "application/octet-stream"))
    return ImageRow(
        sha256=sha256,
        label=candidate.label,
        source=candidate.recorded_source or candidate.location,
        object_key=key,
        width=loaded.width,
        height=loaded.height,
        byte_size=len(data),
        origin=candidate.origin,
        kind=candidate.kind,
        **{column: descriptors[column] for column in COLOR_COLUMNS},
    )
