"""The embedding store: backbone features computed once per (image, spec, view), kept as Parquet shards.

Each shard is one Parquet file in the object store (``embeddings/{spec}/{uuid}.parquet``: a row per image and
view, the 1280 features as float16), written whole, then recorded in the database (``embedding_shards``, and an
``embeddings`` row per image and view) in one transaction, so a shard is either complete and known or absent. A
retrain computes only what is missing; a feature-set version refers to images, and their embeddings are found
here by hash. Reading streams shard by shard into one preallocated matrix: memory is that matrix plus a shard.

Which photos get the ``small`` view (used only to judge the model on small photos) is decided by their hash, so
the choice is stable as data grows: all of them up to :data:`EVALUATION_PHOTOS`, a hash-selected sample beyond.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import insert, select

from services.trainer.extractor import EXTRACTOR_FILE, EmbeddingSpec
from shared.storage import ObjectStore
from shared.tables import EmbeddingRow, EmbeddingShardRow

FEATURES = 1280
EVALUATION_PHOTOS = 4000
"""Photos judged by cross-validation at most (and given a ``small`` view): beyond it a hash-selected sample, whose
estimate's standard error (about 0.3 points at 4,000) is already below the fold-to-fold spread."""
SCHEMA = pa.schema(
    [("sha256", pa.string()), ("view", pa.string()), ("vector", pa.list_(pa.float16(), FEATURES))],
)


def sample_fraction(photos: int, cap: int = EVALUATION_PHOTOS) -> float:
    return min(1.0, cap / photos) if photos else 1.0


def in_sample(sha256: str, fraction: float) -> bool:
    """Whether a photo is in the evaluation sample: by its hash, so a photo once in stays in as long as the fraction
    does not shrink (and a growing data set only adds photos to it or drops some)."""
    return fraction >= 1.0 or int(sha256[8:20], 16) < fraction * 16**12


def prefix(spec: EmbeddingSpec) -> str:
    return f"embeddings/{spec.key}"


def extractor_key(spec: EmbeddingSpec) -> str:
    return f"{prefix(spec)}/{EXTRACTOR_FILE}"


async def known(sessions, spec: EmbeddingSpec) -> dict[str, set[str]]:
    """The views already computed for each image under ``spec``."""
    async with sessions() as session:
        query = select(EmbeddingRow.sha256, EmbeddingRow.view).where(EmbeddingRow.spec == spec.key)
        rows = await session.execute(query)
        views: dict[str, set[str]] = {}
        for sha256, view in rows:
            views.setdefault(sha256, set()).add(view)
    return views


@dataclass(frozen=True, slots=True)
class Computed:
    """One shard's worth of new embeddings, before it is written."""

    sha256: list[str]
    view: list[str]
    vectors: np.ndarray
    """float16 ``(rows, FEATURES)``."""


async def write_shard(store: ObjectStore, sessions, spec: EmbeddingSpec, computed: Computed) -> int:
    """Write the Parquet file, then its rows in one transaction; rows another process recorded meanwhile are
    skipped (their embeddings are the same bits). Returns how many were recorded here."""
    table = pa.table(
        {
            "sha256": computed.sha256,
            "view": computed.view,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(computed.vectors.reshape(-1)), FEATURES),
        },
        schema=SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=1024)
    key = f"{prefix(spec)}/{uuid.uuid4().hex}.parquet"
    await store.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
    async with sessions() as session:
        existing = set(
            (
                await session.execute(
                    select(EmbeddingRow.sha256, EmbeddingRow.view).where(
                        EmbeddingRow.spec == spec.key, EmbeddingRow.sha256.in_(sorted(set(computed.sha256)))
                    )
                )
            ).all()
        )
        shard = EmbeddingShardRow(spec=spec.key, object_key=key, rows=table.num_rows)
        session.add(shard)
        await session.flush()
        rows = [
            {"sha256": sha, "spec": spec.key, "view": view, "shard_id": shard.id}
            for sha, view in zip(computed.sha256, computed.view, strict=True)
            if (sha, view) not in existing
        ]
        if rows:
            await session.execute(insert(EmbeddingRow), rows)
        await session.commit()
    return len(rows)


async def load(
    store: ObjectStore, sessions, spec: EmbeddingSpec, hashes: Sequence[str], views: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of ``views`` of ``hashes``: float16 ``(len(views), n, FEATURES)`` (each view's rows
    contiguous: the head's rows are ``matrix[:v].reshape(-1, FEATURES)`` without a copy), and a boolean
    ``(len(views), n)`` saying which were found (a photo outside the evaluation sample has no ``small`` view)."""
    index = {sha: i for i, sha in enumerate(hashes)}
    slot = {view: j for j, view in enumerate(views)}
    matrix = np.zeros((len(views), len(hashes), FEATURES), np.float16)
    found = np.zeros((len(views), len(hashes)), bool)
    async with sessions() as session:
        shards = (
            await session.execute(
                select(EmbeddingShardRow.id, EmbeddingShardRow.object_key)
                .where(EmbeddingShardRow.id.in_(select(EmbeddingRow.shard_id).where(EmbeddingRow.spec == spec.key)))
                .order_by(EmbeddingShardRow.id)
            )
        ).all()
    for _, key in shards:  # only shards recorded in the database: a file whose rows never committed is ignored
        parquet = pq.ParquetFile(io.BytesIO(await store.get(key)))
        for batch in parquet.iter_batches(batch_size=1024):
            rows, targets, columns = [], [], []
            for row, (sha, view) in enumerate(
                zip(batch.column("sha256").to_pylist(), batch.column("view").to_pylist(), strict=True)
            ):
                if sha in index and view in slot:
                    rows.append(row)
                    targets.append(index[sha])
                    columns.append(slot[view])
            if rows:
                vectors = batch.column("vector").values.to_numpy(zero_copy_only=False).reshape(-1, FEATURES)
                matrix[columns, targets] = vectors[rows]
                found[columns, targets] = True
    return matrix, found


async def cached_extractor(store: ObjectStore, spec: EmbeddingSpec) -> bytes | None:
    key = extractor_key(spec)
    return await store.get(key) if await store.exists(key) else None
