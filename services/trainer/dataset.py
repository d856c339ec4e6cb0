"""A feature set's Parquet table -> arrays per split, decoded by the shared preprocessing (as the API does)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shared.images import preprocess
from shared.labels import LABELS


@dataclass(frozen=True, slots=True)
class Split:
    x: np.ndarray
    """float32 ``(n, 224, 224, 3)`` in [0, 1]."""
    y: np.ndarray
    """int ``(n,)``: index into :data:`LABELS`."""
    sha256: list[str]
    image: list[bytes]

    def __len__(self) -> int:
        return len(self.y)


def splits_from_table(table: pa.Table) -> dict[str, Split]:
    stored = (table.schema.metadata or {}).get(b"labels", b"").decode()
    if stored and tuple(stored.split(",")) != LABELS:
        raise ValueError(f"feature set label order {stored!r} differs from the product's {LABELS}")
    columns = table.select(["sha256", "label", "split", "image"]).to_pydict()
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(preprocess, columns["image"]))
    result: dict[str, Split] = {}
    for split in ("train", "val", "test"):
        index = [i for i, s in enumerate(columns["split"]) if s == split]
        result[split] = Split(
            x=np.stack([arrays[i] for i in index]) if index else np.zeros((0, 224, 224, 3), np.float32),
            y=np.array([LABELS.index(columns["label"][i]) for i in index], dtype=np.int64),
            sha256=[columns["sha256"][i] for i in index],
            image=[columns["image"][i] for i in index],
        )
    return result
