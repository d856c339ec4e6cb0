"""Feature sets on real MariaDB + S3: a Parquet per version, stratified split, descriptors, no needless rebuild."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from services.trainer.features import FeatureSetError, assign_splits, build_features, load_feature_set
from services.trainer.ingest import ingest
from services.trainer.settings import TrainerSettings
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.storage import open_store


def test_features_from_ingested_photos(stack_settings: TrainerSettings, data_dir: Path) -> None:
    asyncio.run(ingest(stack_settings, str(data_dir), progress=False))
    built = asyncio.run(build_features(stack_settings, progress=False))
    assert built.created and built.row.version == 1 and built.row.row_count == 320

    async def parquet_bytes() -> bytes:
        async with open_store(stack_settings.store) as store:
            return await store.get(built.row.object_key)

    table = pq.read_table(io.BytesIO(asyncio.run(parquet_bytes())))
    assert table.num_rows == 320
    assert set(DESCRIPTOR_COLUMNS) <= set(table.column_names)
    labels = table["label"].to_pylist()
    splits = table["split"].to_pylist()
    assert Counter(labels) == {"dandelion": 160, "grass": 160}
    per = Counter(zip(labels, splits, strict=True))
    for label in ("dandelion", "grass"):
        assert per[label, "test"] == per[label, "val"] == 24
        assert per[label, "train"] == 112
    assert built.row.split_counts["test"] == 48

    # Descriptors are plausible; images are referenced, never copied (a version is a few kB a hundred photos).
    assert min(table["width"].to_pylist()) > 0
    for column in ("rgb_r_mean", "hsv_v_std"):
        values = np.array(table[column].to_pylist())
        assert ((values >= 0) & (values <= 1)).all() and values.std() > 0
    first = table.slice(0, 1).to_pylist()[0]
    assert "image" not in table.column_names and first["object_key"].startswith(f"raw/{first['label']}/")
    assert set(table["origin"].to_pylist()) == {"dandelion-grass"} and first["kind"] == first["label"]
    assert len(asyncio.run(parquet_bytes())) < 100_000

    again = asyncio.run(build_features(stack_settings, progress=False))
    assert not again.created and again.row.version == 1

    more = asyncio.run(build_features(stack_settings, force=True, progress=False))
    assert more.created and more.row.version == 2
    row, loaded = asyncio.run(load_feature_set(stack_settings))
    assert row.version == 2 and loaded.num_rows == 320
    assert loaded["split"].to_pylist() == splits, "the same images get the same split in every version"


def test_features_need_images(stack_settings: TrainerSettings) -> None:
    with pytest.raises(FeatureSetError, match="no images"):
        asyncio.run(build_features(stack_settings, progress=False))
    with pytest.raises(FeatureSetError):
        asyncio.run(load_feature_set(stack_settings))


def test_split_is_stable_when_data_grows() -> None:
    rng = np.random.default_rng(0)
    hashes = [f"{rng.integers(2**63):016x}" * 4 for _ in range(200)]
    before = assign_splits({"a": hashes[:160]}, 15, 15)
    after = assign_splits({"a": hashes}, 15, 15)
    moved = sum(before[h] != after[h] for h in before)
    assert Counter(after.values()) == {"train": 140, "val": 30, "test": 30}
    assert moved <= 40, "growing by 40 images moves at most about that many across the boundaries"


def test_feedback_images_are_only_ever_trained_on() -> None:
    curated = {"dandelion": [f"d{i:03d}" for i in range(40)], "grass": [f"g{i:03d}" for i in range(40)]}
    feedback = {"a-from-users", "b-from-users", "c-from-users"}  # hash order would put them first: in test
    grown = {"dandelion": [*curated["dandelion"], "a-from-users"], "grass": [*curated["grass"], "b-from-users"]}
    grown["grass"].append("c-from-users")
    splits = assign_splits(grown, 15, 15, train_only=feedback)
    assert {h: splits[h] for h in feedback} == dict.fromkeys(feedback, "train")
    assert splits | {} == {**assign_splits(curated, 15, 15), **dict.fromkeys(feedback, "train")}  # others unmoved


def test_other_subfolders_are_photos_of_neither_split_by_kind(stack_settings: TrainerSettings, tmp_path: Path) -> None:
    from tests.crafted import write_crafted_folder

    folder = write_crafted_folder(tmp_path / "lawns", per_class=20, refused={"daisy": 20, "rose": 10})
    report = asyncio.run(ingest(stack_settings, f"mine={folder}", progress=False))
    assert report.new_by_label == {"dandelion": 20, "grass": 20, "neither": 30}
    built = asyncio.run(build_features(stack_settings, progress=False))
    _, table = asyncio.run(load_feature_set(stack_settings))
    rows = table.to_pylist()
    assert {(r["label"], r["kind"]) for r in rows} == {
        ("dandelion", "dandelion"),
        ("grass", "grass"),
        ("neither", "daisy"),
        ("neither", "rose"),
    }
    assert {r["origin"] for r in rows} == {"mine"}
    groups = built.row.split_counts["by_group"]
    assert groups["neither/daisy"] == {"train": 14, "val": 3, "test": 3}
    assert groups["neither/rose"]["test"] == 2 and groups["dandelion/mine"]["test"] == 3


def test_rows_ingested_before_descriptors_get_them_once(stack_settings: TrainerSettings, data_dir: Path) -> None:
    """A database from before ingest described photos: the feature store reads those images once and keeps the
    numbers in the images table."""
    from sqlalchemy import update

    from shared.db import open_database
    from shared.descriptors import COLOR_COLUMNS
    from shared.tables import ImageRow

    asyncio.run(ingest(stack_settings, str(data_dir), per_class=3, progress=False))
    fresh = asyncio.run(build_features(stack_settings, progress=False))
    _, described = asyncio.run(load_feature_set(stack_settings))

    async def forget() -> None:
        async with open_database(stack_settings.database) as sessions, sessions() as session:
            await session.execute(update(ImageRow).values(**dict.fromkeys(COLOR_COLUMNS), origin=None))
            await session.commit()

    asyncio.run(forget())
    again = asyncio.run(build_features(stack_settings, force=True, progress=False))
    assert again.row.version == fresh.row.version + 1
    _, table = asyncio.run(load_feature_set(stack_settings))
    for column in COLOR_COLUMNS:
        np.testing.assert_allclose(table[column].to_numpy(), described[column].to_numpy(), rtol=1e-5)
    assert set(table["origin"].to_pylist()) == {"unknown"}
