"""Versioned feature sets: one self-contained Parquet snapshot of the ingested images per version.

A row per image: its hash, label, object key, split, descriptive features and the image bytes
themselves, so a feature set is an immutable training snapshot (a later ingest cannot change what a
past model was trained on). The ``feature_sets`` table records every version and the exact image set
(``source_snapshot``) it was built from. Training reads data only through here, never by listing folders.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select
from tqdm import tqdm

from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import DESCRIPTOR_COLUMNS, prepare
from shared.labels import LABELS
from shared.storage import open_store
from shared.tables import FeatureSetRow, ImageRow

SPLITS = ("train", "val", "test")


FEEDBACK_SOURCE_PREFIX = "feedback:"
"""``images.source`` of production photos ingested from feedback (``ingest --from-feedback``)."""


class FeatureSetError(RuntimeError):
    """No feature set can be built or found."""


def assign_splits(
    hashes_by_label: dict[str, list[str]], val_percent: int, test_percent: int, train_only: set[str] | None = None
) -> dict[str, str]:
    """Stratified, deterministic split: within each label, images in hash order, the first share to test.

    Exactly ``test_percent`` / ``val_percent`` of every label (rounded), independent of ingest order. Because
    the order is by content hash, adding images moves only a few images across the split boundaries.
    ``train_only`` images (production photos labelled through feedback) are always trained on and never
    evaluated on: the validation and test splits, which the quality gate judges models by, stay curated
    data that users of the API cannot label.
    """
    splits: dict[str, str] = dict.fromkeys(train_only or (), "train")
    for label_hashes in hashes_by_label.values():
        hashes = [h for h in label_hashes if h not in splits]
        ordered = sorted(hashes)
        n_test = round(len(ordered) * test_percent / 100)
        n_val = round(len(ordered) * val_percent / 100)
        for rank, sha256 in enumerate(ordered):
            splits[sha256] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def snapshot_of(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class FeatureSet:
    row: FeatureSetRow
    created: bool

    def summary(self) -> str:
        verb = "built" if self.created else "is up to date:"
        counts = ", ".join(f"{split} {self.row.split_counts[split]}" for split in SPLITS)
        return (
            f"features: {verb} {self.row.name} v{self.row.version} "
            f"({self.row.row_count} rows: {counts}) at {self.row.object_key}"
        )


SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int8()),
        ("object_key", pa.string()),
        ("split", pa.string()),
        *[(column, pa.float32()) for column in DESCRIPTOR_COLUMNS],
        ("image", pa.binary()),
    ],
    metadata={"labels": ",".join(LABELS)},
)


async def build_features(settings: TrainerSettings, *, force: bool = False, progress: bool = True) -> FeatureSet:
    """Build the next feature-set version, or return the latest one if the images have not changed."""
    async with open_store(settings.store) as store, open_database(settings.database) as sessions:
        async with sessions() as session:
            rows = list((await session.scalars(select(ImageRow).order_by(ImageRow.sha256))).all())
            latest = await _latest(session, settings.feature_set_name)
        if not rows:
            raise FeatureSetError("no images are ingested yet: run `python -m services.trainer ingest` first")
        snapshot = snapshot_of([r.sha256 for r in rows])
        if latest is not None and latest.source_snapshot == snapshot and not force:
            return FeatureSet(latest, created=False)

        by_label: dict[str, list[str]] = {}
        for r in rows:
            by_label.setdefault(r.label, []).append(r.sha256)
        feedback = {r.sha256 for r in rows if r.source.startswith(FEEDBACK_SOURCE_PREFIX)}
        splits = assign_splits(by_label, settings.split_val_percent, settings.split_test_percent, feedback)
        limit = asyncio.Semaphore(16)
        bar = tqdm(total=len(rows), desc="features", unit="img", disable=not progress, file=sys.stderr)

        async def record(row: ImageRow) -> dict[str, object]:
            async with limit:
                data = await store.get(row.object_key)
            values = await asyncio.to_thread(_describe, data)
            bar.update()
            return {
                "sha256": row.sha256,
                "label": row.label,
                "label_index": LABELS.index(row.label),
                "object_key": row.object_key,
                "split": splits[row.sha256],
                **values,
                "image": data,
            }

        try:
            records = await asyncio.gather(*(record(r) for r in rows))
        finally:
            bar.close()
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")

        version = (latest.version if latest else 0) + 1
        key = f"features/{settings.feature_set_name}/v{version:04d}.parquet"
        await store.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
        split_counts = {split: sum(1 for r in records if r["split"] == split) for split in SPLITS}
        split_counts["by_label"] = {
            label: {split: sum(1 for r in records if r["split"] == split and r["label"] == label) for split in SPLITS}
            for label in LABELS
        }
        feature_set = FeatureSetRow(
            name=settings.feature_set_name,
            version=version,
            object_key=key,
            row_count=table.num_rows,
            schema={field.name: str(field.type) for field in SCHEMA},
            source_snapshot=snapshot,
            split_counts=split_counts,
        )
        async with sessions() as session:
            session.add(feature_set)
            await session.commit()
        return FeatureSet(feature_set, created=True)


def _describe(data: bytes) -> dict[str, float]:
    return prepare(data).descriptors


async def _latest(session, name: str) -> FeatureSetRow | None:
    query = select(FeatureSetRow).where(FeatureSetRow.name == name).order_by(FeatureSetRow.version.desc()).limit(1)
    return (await session.scalars(query)).first()


async def load_feature_set(settings: TrainerSettings, version: int | None = None) -> tuple[FeatureSetRow, pa.Table]:
    """The feature set ``version`` (default: the latest) and its Parquet table."""
    async with open_database(settings.database) as sessions, sessions() as session:
        if version is None:
            row = await _latest(session, settings.feature_set_name)
        else:
            query = select(FeatureSetRow).where(
                FeatureSetRow.name == settings.feature_set_name, FeatureSetRow.version == version
            )
            row = (await session.scalars(query)).first()
    if row is None:
        wanted = f"v{version}" if version is not None else "any version"
        raise FeatureSetError(f"no feature set {settings.feature_set_name} {wanted}: run `features` first")
    async with open_store(settings.store) as store:
        data = await store.get(row.object_key)
    return row, pq.read_table(io.BytesIO(data))
