"""Versioned feature sets: which images a model is trained and judged on, by reference, one Parquet per version.

A row per image: its hash, label, kind, origin (the source's name), object key, split and descriptive features.
Images are referenced, never copied: the bytes stay where ingest stored them (content-addressed, immutable), and
the backbone's embeddings are kept once per image in the embedding store (:mod:`embeddings`), so a new version
costs a few megabytes at 100,000 photos and no image is read to build it. The ``feature_sets`` table records every
version and the exact image set (``source_snapshot``) it was built from. Training reads data only through here.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select, update
from tqdm import tqdm

from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import COLOR_COLUMNS, DESCRIPTOR_COLUMNS, prepare
from shared.labels import LABELS, NEITHER, TRAINING_LABELS
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
    """Stratified, deterministic split: within each group (a label and where its photos come from: see
    :func:`group_of`), images in hash order, the first share to test.

    Exactly ``test_percent`` / ``val_percent`` of every group (rounded), independent of ingest order. Because
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


def group_of(label: str, origin: str | None, kind: str | None) -> str:
    """What the split is stratified by, and what per-group figures are reported for: a class and its source
    (``dandelion/flowers``), or a kind of photo the model refuses (``neither/daisy``)."""
    if label == NEITHER:
        return f"{NEITHER}/{kind or 'unknown'}"
    return f"{label}/{origin or 'unknown'}"


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
        ("kind", pa.string()),
        ("origin", pa.string()),
        ("object_key", pa.string()),
        ("split", pa.string()),
        *[(column, pa.float32()) for column in DESCRIPTOR_COLUMNS],
    ],
    metadata={"labels": ",".join(LABELS), "training_labels": ",".join(TRAINING_LABELS)},
)


async def build_features(settings: TrainerSettings, *, force: bool = False, progress: bool = True) -> FeatureSet:
    """Build the next feature-set version, or return the latest one if the images have not changed."""
    async with open_database(settings.database) as sessions:
        async with sessions() as session:
            rows = list((await session.scalars(select(ImageRow).order_by(ImageRow.sha256))).all())
            latest = await _latest(session, settings.feature_set_name)
        if not rows:
            raise FeatureSetError("no images are ingested yet: run `python -m services.trainer ingest` first")
        if not any(r.label in LABELS for r in rows):
            raise FeatureSetError(f"no photo of {' or '.join(LABELS)} is ingested: there is nothing to learn")
        snapshot = snapshot_of([r.sha256 for r in rows])
        if latest is not None and latest.source_snapshot == snapshot and not force:
            return FeatureSet(latest, created=False)
        await _describe_missing(settings, sessions, [r for r in rows if r.rgb_r_mean is None], progress)

        by_group: dict[str, list[str]] = {}
        for r in rows:
            by_group.setdefault(group_of(r.label, r.origin, r.kind), []).append(r.sha256)
        feedback = {r.sha256 for r in rows if r.source.startswith(FEEDBACK_SOURCE_PREFIX)}
        splits = assign_splits(by_group, settings.split_val_percent, settings.split_test_percent, feedback)
        records = [
            {
                "sha256": r.sha256,
                "label": r.label,
                "kind": r.kind or r.label,
                "origin": r.origin or "unknown",
                "object_key": r.object_key,
                "split": splits[r.sha256],
                "width": float(r.width),
                "height": float(r.height),
                **{column: getattr(r, column) for column in COLOR_COLUMNS},
            }
            for r in rows
        ]
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")

        version = (latest.version if latest else 0) + 1
        key = f"features/{settings.feature_set_name}/v{version:04d}.parquet"
        async with open_store(settings.store) as store:
            await store.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
        feature_set = FeatureSetRow(
            name=settings.feature_set_name,
            version=version,
            object_key=key,
            row_count=table.num_rows,
            schema={field.name: str(field.type) for field in SCHEMA},
            source_snapshot=snapshot,
            split_counts=_counts(records),
        )
        async with sessions() as session:
            session.add(feature_set)
            await session.commit()
        return FeatureSet(feature_set, created=True)


def _counts(records: list[dict[str, object]]) -> dict[str, object]:
    """Rows per split, and per split within each label and each group (what the model card and the run show)."""
    counts: dict[str, object] = {split: sum(1 for r in records if r["split"] == split) for split in SPLITS}
    by_label: dict[str, dict[str, int]] = {}
    by_group: dict[str, dict[str, int]] = {}
    for r in records:
        for table, key in ((by_label, r["label"]), (by_group, group_of(r["label"], r["origin"], r["kind"]))):
            table.setdefault(str(key), dict.fromkeys(SPLITS, 0))[str(r["split"])] += 1
    counts["by_label"] = by_label
    counts["by_group"] = by_group
    return counts


async def _describe_missing(settings: TrainerSettings, sessions, rows: list[ImageRow], progress: bool) -> None:
    """Fill in the descriptors of images ingested before ingest computed them (read once, then kept)."""
    if not rows:
        return
    limit = asyncio.Semaphore(8)
    bar = tqdm(total=len(rows), desc="describe", unit="img", disable=not progress, file=sys.stderr)

    async def one(store, row: ImageRow) -> None:
        async with limit:
            data = await store.get(row.object_key)
            values = await asyncio.to_thread(lambda: prepare(data).descriptors)
        for column in COLOR_COLUMNS:
            setattr(row, column, values[column])
        bar.update()

    try:
        async with open_store(settings.store) as store:
            for start in range(0, len(rows), 500):
                chunk = rows[start : start + 500]
                await asyncio.gather(*(one(store, row) for row in chunk))
                async with sessions() as session:
                    for row in chunk:
                        values = {column: getattr(row, column) for column in COLOR_COLUMNS}
                        await session.execute(update(ImageRow).where(ImageRow.id == row.id).values(**values))
                    await session.commit()
    finally:
        bar.close()


async def _latest(session, name: str) -> FeatureSetRow | None:
    query = select(FeatureSetRow).where(FeatureSetRow.name == name).order_by(FeatureSetRow.version.desc()).limit(1)
    return (await session.scalars(query)).first()


async def load_feature_set(settings: TrainerSettings, version: int | None = None) -> tuple[FeatureSetRow, pa.Table]:
    """The feature set ``version`` (default: the latest) and its Parquet table (a few MB at 100,000 photos)."""
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
