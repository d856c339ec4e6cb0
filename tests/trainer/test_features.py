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
from shared.images import preprocess
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

    # Descriptors are plausible and the stored bytes are the images themselves.
    assert min(table["width"].to_pylist()) > 0
    for column in ("rgb_r_mean", "hsv_v_std"):
        values = np.array(table[column].to_pylist())
        assert ((values >= 0) & (values <= 1)).all() and values.std() > 0
    first = table.slice(0, 1).to_pylist()[0]
    assert preprocess(first["image"]).shape == (224, 224, 3)

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
