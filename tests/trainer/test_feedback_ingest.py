"""``ingest --from-feedback`` on real MariaDB + S3: labelled production uploads join the training images.

The predictions, feedback rows and upload objects are written here as the API writes them (the table
layout of ``shared/tables.py`` and the ``uploads/{YYYY}/{MM}/{DD}/{id}.{ext}`` keys are the seam).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from sqlalchemy import select

from services.trainer.cli import main
from services.trainer.features import build_features
from services.trainer.ingest import ingest, ingest_feedback
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import prepare
from shared.storage import open_store
from shared.tables import FeedbackRow, ImageRow, PredictionRow
from tests.crafted import crafted, crafted_jpeg, write_crafted_folder

START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def api_prediction(
    data: bytes,
    *,
    model_name: str = "dandelion-grass",
    created_at: datetime = START,
    stored: bool = True,
    ext: str = "jpg",
    label: str = "grass",
) -> tuple[PredictionRow, str | None]:
    """A ``predictions`` row as the API writes it for ``data``, and the key its upload is kept under (or None)."""
    prediction_id = uuid.uuid4().hex
    key = f"uploads/{created_at:%Y/%m/%d}/{prediction_id}.{ext}" if stored else None
    row = PredictionRow(
        id=prediction_id,
        created_at=created_at,
        endpoint="predict",
        model_name=model_name,
        model_version="1",
        label=label,
        confidence=0.9,
        latency_ms=12.0,
        image_sha256=hashlib.sha256(data).hexdigest() if stored else None,
        image_key=key,
        **prepare(data).descriptors,
    )
    return row, key


async def record(
    settings: TrainerSettings,
    predictions: list[tuple[PredictionRow, str | None, bytes | None]],
    feedback: list[tuple[str, str]] = (),
) -> None:
    """Write ``(row, key, bytes to keep under key)`` and ``(prediction id, label)`` feedback, in order."""
    async with open_store(settings.store) as store:
        for _, key, data in predictions:
            if key is not None and data is not None:
                await store.put(key, data)
    async with open_database(settings.database) as sessions, sessions() as session:
        session.add_all(row for row, _, _ in predictions)
        await session.flush()
        for i, (prediction_id, label) in enumerate(feedback):
            session.add(FeedbackRow(prediction_id=prediction_id, label=label, created_at=START + timedelta(hours=i)))
        await session.commit()


def png(label: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    crafted(label, seed).save(buffer, "PNG")
    return buffer.getvalue()


async def images_and_objects(settings: TrainerSettings) -> tuple[dict[str, ImageRow], dict[str, bytes]]:
    async with open_database(settings.database) as sessions, sessions() as session:
        rows = {r.sha256: r for r in (await session.scalars(select(ImageRow))).all()}
    async with open_store(settings.store) as store:
        objects = {key: await store.get(key) for key in await store.list("raw/")}
    return rows, objects


@pytest.fixture
def cli_env(stack_settings: TrainerSettings, monkeypatch: pytest.MonkeyPatch) -> TrainerSettings:
    monkeypatch.setenv("DATABASE_URL", stack_settings.database.url.get_secret_value())
    monkeypatch.setenv("OBJECT_STORE_URL", stack_settings.store.url)
    monkeypatch.setenv("S3_ENDPOINT_URL", stack_settings.store.endpoint_url or "")
    return stack_settings


def test_feedback_images_are_ingested_with_the_feedback_label(
    cli_env: TrainerSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = cli_env
    folder = write_crafted_folder(tmp_path / "photos", per_class=3)
    asyncio.run(ingest(settings, str(folder), progress=False))
    known_grass = (folder / "grass" / "00000000.jpg").read_bytes()

    corrected = crafted_jpeg("dandelion", 500)  # the model said grass; the user says dandelion
    as_png = png("grass", 501)
    relabelled = crafted_jpeg("grass", 502)  # labelled twice: the later feedback wins
    uploads = {
        "corrected": (corrected, "jpg", True),
        "png": (as_png, "png", True),
        "relabelled": (relabelled, "jpg", True),
        "relabelled_again": (relabelled, "jpg", True),
        "known": (known_grass, "jpg", True),  # already ingested as grass: a duplicate, and a conflict
        "not_kept_1": (crafted_jpeg("grass", 503), "jpg", False),  # API_STORE_UPLOADS was off
        "not_kept_2": (crafted_jpeg("dandelion", 504), "jpg", False),
        "expired": (crafted_jpeg("grass", 505), "jpg", True),  # key recorded, object since deleted
        "odd_label": (crafted_jpeg("grass", 506), "jpg", True),
        "no_feedback": (crafted_jpeg("dandelion", 507), "jpg", True),
    }
    written: dict[str, tuple[PredictionRow, str | None, bytes | None]] = {}
    for i, (name, (data, ext, stored)) in enumerate(uploads.items()):
        row, key = api_prediction(data, created_at=START + timedelta(minutes=i), stored=stored, ext=ext)
        written[name] = (row, key, None if name == "expired" else data)
    feedback = [
        ("corrected", "dandelion"),
        ("png", "grass"),
        ("relabelled", "dandelion"),
        ("known", "dandelion"),
        ("not_kept_1", "grass"),
        ("not_kept_2", "dandelion"),
        ("expired", "grass"),
        ("odd_label", "clover"),
        ("relabelled_again", "grass"),
    ]
    asyncio.run(record(settings, list(written.values()), [(written[n][0].id, label) for n, label in feedback]))
    before, _ = asyncio.run(images_and_objects(settings))

    assert main(["ingest", "--from-feedback", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # only the feedback: --source was not given
    print(f"\n{out[0]}")
    assert out[0].startswith(
        "ingest (feedback): 3 new, 2 already stored, 1 rejected (1 unknown_label), 1 missing, 0 failed"
    )
    assert "9 feedback rows" in out[0]
    assert "2 without a stored image (API_STORE_UPLOADS off, " in out[0]
    assert "1 disagree with the label already recorded" in out[0]

    rows, objects = asyncio.run(images_and_objects(settings))
    added = {sha: row for sha, row in rows.items() if sha not in before}
    expected = {
        hashlib.sha256(corrected).hexdigest(): ("dandelion", "jpg", written["corrected"][0].id, corrected),
        hashlib.sha256(as_png).hexdigest(): ("grass", "png", written["png"][0].id, as_png),
        hashlib.sha256(relabelled).hexdigest(): ("grass", "jpg", written["relabelled_again"][0].id, relabelled),
    }
    assert set(added) == set(expected)
    for sha, (label, ext, prediction_id, data) in expected.items():
        row = added[sha]
        assert (row.label, row.source) == (label, f"feedback:{prediction_id}")
        assert row.object_key == f"raw/{label}/{sha}.{ext}"
        assert objects[row.object_key] == data
        assert (row.width, row.height, row.byte_size) == (*Image.open(io.BytesIO(data)).size, len(data))
    assert rows[hashlib.sha256(known_grass).hexdigest()].label == "grass", "an existing label is never rewritten"
    assert set(objects) == {r.object_key for r in rows.values()}

    # Idempotent: nothing new, every labelled upload a duplicate. Known uploads are not downloaded again
    # (their recorded hash suffices): one overwritten with garbage still counts as a duplicate, not a reject.
    async def overwrite(key: str) -> None:
        async with open_store(settings.store) as store:
            await store.put(key, b"garbage")

    asyncio.run(overwrite(written["corrected"][1]))
    again = asyncio.run(ingest_feedback(settings, progress=False))
    counts = (again.new, again.duplicate, again.missing, again.not_stored, sum(again.rejected.values()))
    assert counts == (0, 5, 1, 2, 1)
    after, after_objects = asyncio.run(images_and_objects(settings))
    assert {sha: (r.id, r.label, r.object_key) for sha, r in after.items()} == {
        sha: (r.id, r.label, r.object_key) for sha, r in rows.items()
    }
    assert after_objects == objects

    # The next feature set holds them, with the feedback's label.
    built = asyncio.run(build_features(settings, progress=False))
    assert built.created and built.row.row_count == len(before) + 3

    async def parquet() -> bytes:
        async with open_store(settings.store) as store:
            return await store.get(built.row.object_key)

    table = pq.read_table(io.BytesIO(asyncio.run(parquet())), columns=["sha256", "label", "object_key"])
    by_sha = {r["sha256"]: r for r in table.to_pylist()}
    for sha, (label, _, _, _) in expected.items():
        assert by_sha[sha]["label"] == label
        assert by_sha[sha]["object_key"] == added[sha].object_key


def test_no_feedback_is_not_an_error(cli_env: TrainerSettings, capsys: pytest.CaptureFixture[str]) -> None:
    row, key = api_prediction(crafted_jpeg("grass", 600), stored=False)
    asyncio.run(record(cli_env, [(row, key, None)]))
    assert main(["ingest", "--from-feedback", "--quiet"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("ingest (feedback): 0 new, 0 already stored")
    assert line.endswith("0 feedback rows")

    # Feedback exists, but the API kept no upload: the summary says why nothing was added.
    asyncio.run(record(cli_env, [], [(row.id, "dandelion")]))
    assert main(["ingest", "--from-feedback", "--quiet"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("ingest (feedback): 0 new, 0 already stored")
    assert "1 feedback row, 1 without a stored image (API_STORE_UPLOADS off, " in line


def test_neither_feedback_joins_as_a_refused_photo_never_as_either_class(
    cli_env: TrainerSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flagged photo the user called "neither" (a lizard the page once filed as grass) is ingested with the label
    ``neither``: the head learns to refuse it; it never becomes a dandelion or grass photo."""
    settings = cli_env
    folder = write_crafted_folder(tmp_path / "photos", per_class=3)
    asyncio.run(ingest(settings, str(folder), progress=False))
    lizard = png("grass", 600)  # green, like grass: exactly the photo that was misfiled
    row, key = api_prediction(lizard, stored=True, ext="png", label="grass")
    row.in_domain = False
    asyncio.run(record(settings, [(row, key, lizard)], [(row.id, "neither")]))

    assert main(["ingest", "--from-feedback", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("ingest (feedback): 1 new, 0 already stored, 0 rejected")
    rows, objects = asyncio.run(images_and_objects(settings))
    added = rows[hashlib.sha256(lizard).hexdigest()]
    assert (added.label, added.kind, added.origin) == ("neither", "feedback", "feedback")
    assert added.source == f"feedback:{row.id}" and objects[added.object_key] == lizard
    assert sorted(r.label for r in rows.values()).count("grass") == 3, "not one more grass photo"

    built = asyncio.run(build_features(settings, progress=False))

    async def parquet() -> bytes:
        async with open_store(settings.store) as store:
            return await store.get(built.row.object_key)

    table = pq.read_table(io.BytesIO(asyncio.run(parquet())), columns=["sha256", "label"])
    labels = {r["sha256"]: r["label"] for r in table.to_pylist()}
    assert labels[added.sha256] == "neither"
    assert sorted(labels.values()).count("grass") == 3
