"""What training sees: a feature set's rows and their embeddings from the store, as arrays. No image is decoded.

The head's classes are the two served labels followed by the kinds of photo the model learns to refuse, sorted
(``dandelion, grass, daisy, rose, ...``). Sample weights give each served class the same total weight, each source
the same weight within a class, and the refused photos as much as the two classes together: the 160 grass photos
count as much as the 668 dandelions, and a source with 508 dandelions does not drown one with 160 (docs/model.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from services.trainer import embeddings
from services.trainer.extractor import TRAINING_VIEWS, EmbeddingSpec
from services.trainer.features import group_of
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.labels import LABELS, NEITHER
from shared.storage import open_store


class DatasetError(RuntimeError):
    """The feature set cannot be trained on (labels it does not know, embeddings missing)."""


@dataclass(frozen=True)
class TrainingData:
    sha256: list[str]
    object_key: list[str]
    label: np.ndarray
    kind: np.ndarray
    origin: np.ndarray
    split: np.ndarray
    group: np.ndarray
    """:func:`services.trainer.features.group_of` of each photo: what splits, weights and per-group figures use."""
    classes: tuple[str, ...]
    """The head's outputs: :data:`LABELS`, then each refused kind."""
    y: np.ndarray
    """Index of each photo's class in :attr:`classes`."""
    views: np.ndarray
    """float16 ``(len(TRAINING_VIEWS), n, features)``: the rows the head is fitted on (view-major, so the rows of
    a set of photos are ``views[:, index].reshape(-1, features)``)."""
    small: np.ndarray
    """float16 ``(n, features)``: the photo at 128 px (``has_small`` says where it was computed)."""
    has_small: np.ndarray
    descriptors: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def served(self) -> np.ndarray:
        """Photos of the two served classes (dandelion, grass)."""
        return self.y < len(LABELS)

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.classes[len(LABELS) :]

    def where(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def weights(self, index: np.ndarray) -> np.ndarray:
        """Sample weights of the photos ``index`` (mean 1): classes even, sources even within a class, the refused
        photos as heavy as the two classes together."""
        served = len(LABELS)
        w = np.zeros(len(index))
        for c in range(served):
            members = self.y[index] == c
            groups = self.group[index][members]
            if not members.any():
                continue
            unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
            w[np.flatnonzero(members)] = 1.0 / (served * len(unique) * counts[inverse])
        refused = self.y[index] >= served
        if refused.any():
            w[refused] = 1.0 / refused.sum()
        return w * (len(index) / w.sum())


def classes_of(labels: np.ndarray, kinds: np.ndarray) -> tuple[str, ...]:
    refused = sorted({str(k) for label, k in zip(labels, kinds, strict=True) if label == NEITHER})
    return (*LABELS, *refused)


async def load(settings: TrainerSettings, table: pa.Table, spec: EmbeddingSpec) -> TrainingData:
    """The arrays of the feature set ``table`` with the embeddings of ``spec`` (all must have been computed)."""
    stored = (table.schema.metadata or {}).get(b"labels", b"").decode()
    if stored and tuple(stored.split(",")) != LABELS:
        raise DatasetError(f"feature set label order {stored!r} differs from the product's {LABELS}")
    table = table.sort_by("sha256")
    columns = table.to_pydict()
    label = np.array(columns["label"])
    kind = np.array(columns.get("kind") or columns["label"])
    origin = np.array(columns.get("origin") or ["unknown"] * len(label))
    unknown = set(label.tolist()) - {*LABELS, NEITHER}
    if unknown:
        raise DatasetError(f"feature set has labels the trainer does not know: {sorted(unknown)}")
    classes = classes_of(label, kind)
    y = np.array([classes.index(str(k) if lab == NEITHER else str(lab)) for lab, k in zip(label, kind, strict=True)])
    async with open_store(settings.store) as store, open_database(settings.database) as sessions:
        matrix, found = await embeddings.load(store, sessions, spec, columns["sha256"], (*TRAINING_VIEWS, "small"))
    views = len(TRAINING_VIEWS)
    missing = int((~found[:views]).any(axis=0).sum())
    if missing:
        raise DatasetError(f"{missing} photos of the feature set have no embeddings yet: run `embed` first")
    return TrainingData(
        sha256=columns["sha256"],
        object_key=columns["object_key"],
        label=label,
        kind=kind,
        origin=origin,
        split=np.array(columns["split"]),
        group=np.array([group_of(str(a), str(b), str(c)) for a, b, c in zip(label, origin, kind, strict=True)]),
        classes=classes,
        y=y,
        views=matrix[:views],
        small=matrix[views],
        has_small=found[views],
        descriptors={name: np.asarray(columns[name], np.float64) for name in DESCRIPTOR_COLUMNS},
    )


def load_sync(settings: TrainerSettings, table: pa.Table, spec: EmbeddingSpec) -> TrainingData:
    return asyncio.run(load(settings, table, spec))
