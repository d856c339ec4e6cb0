"""Synthetic training data: embeddings drawn around class centres, with sources and refused kinds, built straight
into :class:`TrainingData` (no image, no server), for the unit tests of the head, cross-validation, calibration and
the in-domain score."""

from __future__ import annotations

import hashlib

import numpy as np

from services.trainer.dataset import TrainingData, classes_of
from services.trainer.features import group_of
from shared.descriptors import DESCRIPTOR_COLUMNS

FEATURES = 32


def synthetic(
    counts: dict[tuple[str, str, str], int],
    *,
    seed: int = 0,
    spread: float = 1.0,
    features: int = FEATURES,
    separation: float = 3.0,
) -> TrainingData:
    """``counts[(label, kind, origin)]`` photos each; every kind its own centre ``separation`` apart (unit
    directions); two views per photo (the second slightly moved), and a ``small`` view (blurred towards the
    centre). Splits by hash rank 70/15/15 within each group, as the feature store assigns them."""
    rng = np.random.default_rng(seed)
    centres: dict[str, np.ndarray] = {}
    rows = []
    for (label, kind, origin), n in counts.items():
        centre = centres.setdefault(kind, rng.normal(size=features) * separation / np.sqrt(features) + 5.0)
        for i in range(n):
            sha = hashlib.sha256(f"{label}/{kind}/{origin}/{i}/{seed}".encode()).hexdigest()
            point = centre + spread * rng.normal(size=features) / np.sqrt(features)
            rows.append((sha, label, kind, origin, point))
    rows.sort(key=lambda r: r[0])
    sha256 = [r[0] for r in rows]
    label = np.array([r[1] for r in rows])
    kind = np.array([r[2] for r in rows])
    origin = np.array([r[3] for r in rows])
    group = np.array([group_of(a, b, c) for a, b, c in zip(label, origin, kind, strict=True)])
    split = np.empty(len(rows), object)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)  # already in hash order
        n_test = round(len(members) * 0.15)
        split[members[:n_test]] = "test"
        split[members[n_test : 2 * n_test]] = "val"
        split[members[2 * n_test :]] = "train"
    classes = classes_of(label, kind)
    y = np.array([classes.index(k if lab == "neither" else lab) for lab, k in zip(label, kind, strict=True)])
    points = np.stack([r[4] for r in rows])
    views = np.stack([points, points + 0.05 * rng.normal(size=points.shape)]).astype(np.float16)
    small = (points + 0.3 * rng.normal(size=points.shape)).astype(np.float16)
    return TrainingData(
        sha256=sha256,
        object_key=[f"raw/{lab}/{sha}.jpg" for lab, sha in zip(label, sha256, strict=True)],
        label=label,
        kind=kind,
        origin=origin,
        split=split.astype(str),
        group=group,
        classes=classes,
        y=y,
        views=views,
        small=small,
        has_small=np.ones(len(rows), bool),
        descriptors={name: rng.random(len(rows)) for name in DESCRIPTOR_COLUMNS},
    )


TWO_SOURCES = {
    ("dandelion", "dandelion", "lawns"): 60,
    ("grass", "grass", "lawns"): 60,
    ("dandelion", "dandelion", "flowers"): 90,
    ("neither", "daisy", "flowers"): 80,
    ("neither", "rose", "flowers"): 80,
}
"""The shape of the real data: two sources of dandelions, one of grass, two refused kinds."""
