"""``prune`` on MariaDB + S3: old predictions and their kept uploads go; recent ones and those with feedback stay."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select

from services.trainer.cli import main
from services.trainer.retention import prune_predictions
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.storage import open_store
from shared.tables import FeedbackRow, PredictionRow
from tests.conftest import AWS_ENV
from tests.crafted import crafted_jpeg
from tests.trainer.test_feedback_ingest import START, api_prediction, record


async def state(settings: TrainerSettings) -> tuple[set[str], set[str], set[str]]:
    """Prediction ids, feedback ids and upload keys left."""
    async with open_database(settings.database) as sessions, sessions() as session:
        predictions = set((await session.scalars(select(PredictionRow.id))).all())
        feedback = set((await session.scalars(select(FeedbackRow.prediction_id))).all())
    async with open_store(settings.store) as store:
        keys = set(await store.list("uploads/"))
    return predictions, feedback, keys


def test_prune_keeps_recent_predictions_and_ground_truth(stack_settings: TrainerSettings, monkeypatch, capsys) -> None:
    now = START + timedelta(days=100)
    rows = {}
    for name, age_days, stored in (
        ("old", 95, True),
        ("old-unstored", 91, False),
        ("old-labelled", 99, True),
        ("recent", 10, True),
        ("edge", 89, True),
    ):
        data = crafted_jpeg("grass", len(rows))
        row, key = api_prediction(data, created_at=now - timedelta(days=age_days), stored=stored)
        rows[name] = (row, key, data)
    asyncio.run(record(stack_settings, list(rows.values()), feedback=[(rows["old-labelled"][0].id, "grass")]))

    report = asyncio.run(prune_predictions(stack_settings, 90, now=now))
    print(f"\n{report.summary()}")
    assert (report.deleted, report.uploads, report.kept_for_feedback) == (2, 1, 1)
    predictions, feedback, keys = asyncio.run(state(stack_settings))
    left = {"old-labelled", "recent", "edge"}
    assert predictions == {rows[name][0].id for name in left}
    assert feedback == {rows["old-labelled"][0].id}
    assert keys == {rows[name][1] for name in left}  # the labelled photo may be training data: kept

    # The CLI, with the retention from the environment: nothing older than 90 days is left, so nothing to do.
    env = {
        **AWS_ENV,
        "DATABASE_URL": stack_settings.database.url.get_secret_value(),
        "OBJECT_STORE_URL": stack_settings.store.url,
        "S3_ENDPOINT_URL": stack_settings.store.endpoint_url,
        "TRAINER_PREDICTION_RETENTION_DAYS": "5000",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert main(["prune", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("prune: 0 predictions from before ")
    assert main(["prune", "--quiet", "--older-than-days", "0.001"]) == 0  # everything but the ground truth
    assert capsys.readouterr().out.startswith("prune: 2 predictions from before ")
    predictions, feedback, keys = asyncio.run(state(stack_settings))
    assert predictions == feedback == {rows["old-labelled"][0].id} and keys == {rows["old-labelled"][1]}


async def test_both_stores_delete_and_a_missing_key_is_not_an_error(s3_store, tmp_path) -> None:
    from shared.settings import ObjectStoreSettings

    for settings in (s3_store, ObjectStoreSettings(url=str(tmp_path / "objects"))):
        async with open_store(settings) as store:
            await store.put("uploads/2026/01/01/a.jpg", b"photo")
            await store.delete("uploads/2026/01/01/a.jpg")
            await store.delete("uploads/2026/01/01/a.jpg")  # again: gone already, fine
            assert await store.list("uploads/") == []
