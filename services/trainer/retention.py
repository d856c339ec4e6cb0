"""``python -m services.trainer prune``: the prediction log's retention.

Deletes the ``predictions`` rows older than ``TRAINER_PREDICTION_RETENTION_DAYS`` (90) and the uploads kept for
them (``API_STORE_UPLOADS``), except predictions with feedback: those are ground truth, and their photos may
be training data. Uploads go first, then their rows, so an interrupted run never leaves a photo that no row
points to (the privacy risk); a rerun finishes the job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.storage import open_store
from shared.tables import FeedbackRow, PredictionRow

CHUNK = 1000


@dataclass
class PruneReport:
    cutoff: datetime
    deleted: int = 0
    uploads: int = 0
    kept_for_feedback: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"prune: {self.deleted} predictions from before {self.cutoff:%Y-%m-%d %H:%M} UTC deleted, with "
            f"{self.uploads} stored uploads; {self.kept_for_feedback} kept for their feedback; {self.seconds:.1f} s"
        )


async def prune_predictions(
    settings: TrainerSettings, older_than_days: float | None = None, *, now: datetime | None = None
) -> PruneReport:
    days = settings.prediction_retention_days if older_than_days is None else older_than_days
    report = PruneReport(cutoff=(now or datetime.now(UTC)) - timedelta(days=days))
    started = time.perf_counter()
    labelled = select(FeedbackRow.prediction_id)
    old = PredictionRow.created_at < report.cutoff
    async with open_database(settings.database) as sessions:
        async with sessions() as session:
            report.kept_for_feedback = len(
                (await session.scalars(select(PredictionRow.id).where(old, PredictionRow.id.in_(labelled)))).all()
            )
            doomed = (
                await session.execute(
                    select(PredictionRow.id, PredictionRow.image_key).where(old, PredictionRow.id.not_in(labelled))
                )
            ).all()
        keys = [key for _, key in doomed if key]
        if keys:
            async with open_store(settings.store, create_bucket=False) as store:
                for key in keys:
                    await store.delete(key)
                    report.uploads += 1
        ids = [prediction_id for prediction_id, _ in doomed]
        for i in range(0, len(ids), CHUNK):
            async with sessions() as session:
                chunk = PredictionRow.id.in_(ids[i : i + CHUNK])
                # Not one that got feedback meanwhile: the database would refuse it (foreign key) anyway.
                await session.execute(delete(PredictionRow).where(chunk, PredictionRow.id.not_in(labelled)))
                await session.commit()
            report.deleted += len(ids[i : i + CHUNK])
    report.seconds = time.perf_counter() - started
    return report
