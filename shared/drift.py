"""Input drift: how far recent inputs' descriptors have moved from those of the training data.

A :class:`Reference` holds, per descriptor column (:mod:`shared.descriptors`), the decile bin edges of the
training split and the share of training images in each bin. The trainer builds it from the feature set a
model is trained on and ships it inside the model's metadata, so the API always compares live inputs with
the data of the model it serves. The score is the population stability index (PSI) per feature:

    PSI = sum over bins of (actual - expected) * ln(actual / expected)

Rules of thumb: below 0.1 no shift, 0.1-0.25 a moderate one, above 0.25 a significant one. A window of
``n`` inputs drawn from the training distribution scores about ``(bins - 1) / n`` by chance alone (0.045
for 200 inputs and 10 bins), so windows of a few hundred inputs keep that noise well under the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.descriptors import COLOR_COLUMNS, DESCRIPTOR_COLUMNS

BINS = 10
PSI_THRESHOLD = 0.25
"""A PSI above this on any colour feature is a significant shift (the alert's and ``--if-needed``'s default)."""
ALERTING_FEATURES: tuple[str, ...] = COLOR_COLUMNS
"""Features whose drift alerts. ``width``/``height`` are reported too, but photos from a new camera or site
shift them without changing what the model sees much (every input is resized to 224 x 224)."""
FLOOR = 1e-3
"""Smallest share used in the PSI formula, so an empty bin scores high but finite."""


@dataclass(frozen=True)
class FeatureReference:
    edges: tuple[float, ...]
    """Interior bin edges (increasing, unique); ``len(edges) + 1`` bins, a value ``v`` in bin
    ``searchsorted(edges, v, side="right")``."""
    expected: tuple[float, ...]
    """Share of reference values in each bin."""
    mean: float
    std: float

    def shares(self, values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(self.edges, values, side="right"), minlength=len(self.expected))
        return counts / max(len(values), 1)

    def psi(self, values: np.ndarray) -> float:
        actual = np.maximum(self.shares(values), FLOOR)
        expected = np.maximum(np.asarray(self.expected), FLOOR)
        return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class Reference:
    features: dict[str, FeatureReference]
    samples: int
    source: str = ""
    """What it was computed from, e.g. ``images:v3 train split``."""

    @classmethod
    def build(
        cls, columns: Mapping[str, Sequence[float] | np.ndarray], source: str = "", bins: int = BINS
    ) -> Reference:
        """From the reference values of each descriptor column (the training split of a feature set)."""
        features: dict[str, FeatureReference] = {}
        samples = 0
        for name in DESCRIPTOR_COLUMNS:
            values = np.asarray(columns[name], dtype=np.float64)
            if not len(values):
                raise ValueError("a drift reference needs at least one value per feature")
            samples = len(values)
            quantiles = np.quantile(values, np.arange(1, bins) / bins)
            edges = tuple(float(e) for e in np.unique(quantiles))
            counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
            features[name] = FeatureReference(
                edges=edges,
                expected=tuple(float(c) for c in counts / len(values)),
                mean=float(values.mean()),
                std=float(values.std()),
            )
        return cls(features, samples, source)

    def psi(self, rows: np.ndarray) -> dict[str, float]:
        """PSI per feature of ``rows``: an ``(n, len(DESCRIPTOR_COLUMNS))`` array in column order."""
        return {name: self.features[name].psi(rows[:, i]) for i, name in enumerate(DESCRIPTOR_COLUMNS)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "bins": "deciles",
            "samples": self.samples,
            "source": self.source,
            "features": {
                name: {"edges": list(f.edges), "expected": list(f.expected), "mean": f.mean, "std": f.std}
                for name, f in self.features.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        """The inverse of :meth:`to_dict`; raises ``ValueError`` on anything malformed."""
        try:
            features = {
                name: FeatureReference(
                    edges=tuple(float(e) for e in spec["edges"]),
                    expected=tuple(float(e) for e in spec["expected"]),
                    mean=float(spec["mean"]),
                    std=float(spec["std"]),
                )
                for name, spec in data["features"].items()
            }
            reference = cls(features, int(data["samples"]), str(data.get("source", "")))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed drift reference: {exc!r}") from None
        missing = set(DESCRIPTOR_COLUMNS) - set(features)
        if missing:
            raise ValueError(f"drift reference lacks {sorted(missing)}")
        for name, f in features.items():
            if len(f.expected) != len(f.edges) + 1:
                raise ValueError(f"drift reference for {name}: {len(f.edges)} edges but {len(f.expected)} shares")
        return reference


def as_rows(descriptors: Iterable[Mapping[str, float]]) -> np.ndarray:
    """Descriptor dicts -> an ``(n, len(DESCRIPTOR_COLUMNS))`` float array in column order."""
    rows = [[d[name] for name in DESCRIPTOR_COLUMNS] for d in descriptors]
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(DESCRIPTOR_COLUMNS))


def worst(scores: Mapping[str, float], features: Iterable[str] = ALERTING_FEATURES) -> tuple[str, float]:
    """The alerting feature that drifted most, and its PSI."""
    name = max(features, key=lambda f: scores[f])
    return name, scores[name]
