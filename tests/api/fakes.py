"""A fake model source for API unit tests: our own seam, not a fake of a server."""

from __future__ import annotations

import threading

import numpy as np

from services.api.runtime import LoadedModel, Outputs
from shared.labels import LABELS


def yellowness(x: np.ndarray) -> np.ndarray:
    """P(dandelion) rises with how much brighter red+green are than blue: yellow flowers."""
    score = (x[..., 0] + x[..., 1]) / 2 - x[..., 2]
    p = 1 / (1 + np.exp(-12 * (score.mean(axis=(1, 2)) - 0.35)))
    return np.stack([p, 1 - p], axis=1).astype(np.float32)


def distance(x: np.ndarray) -> np.ndarray:
    """The fake in-domain distance: how far the mean brightness is from 0.4 (white and black are far)."""
    return np.abs(x.mean(axis=(1, 2, 3)) - 0.4).astype(np.float32)


def redness(x: np.ndarray) -> np.ndarray:
    """The fake P(neither): high for photos much redder than green (roses, in this fake's world)."""
    score = (x[..., 0] - x[..., 1]).mean(axis=(1, 2))
    return (1 / (1 + np.exp(-12 * (score - 0.3)))).astype(np.float32)


EXPLAIN_GRID = 3


def evidence(x: np.ndarray) -> np.ndarray:
    """The fake activation map, dandelion minus grass: each cell's yellowness, row-major over a 3 x 3 grid."""
    n, size = len(x), x.shape[1] // EXPLAIN_GRID
    cells = x[:, : size * EXPLAIN_GRID, : size * EXPLAIN_GRID].reshape(n, EXPLAIN_GRID, size, EXPLAIN_GRID, size, 3)
    means = cells.mean(axis=(2, 4))
    return ((means[..., 0] + means[..., 1]) / 2 - means[..., 2] - 0.35).reshape(n, -1).astype(np.float32)


class FakeSource:
    """Serves versions named by ``self.version``; ``fail`` makes the registry unreachable."""

    def __init__(self, version: str = "1", fail: bool = False) -> None:
        self.version = version
        self.fail = fail
        self.loads = 0
        self.calls_per_batch: list[int] = []
        self.lock = threading.Lock()
        self.poison_value: float | None = None
        self.metadata: dict = {}
        """The loaded model's metadata (e.g. a ``drift_reference``)."""
        self.domain_threshold: float | None = None
        """Set: the model also returns an in-domain distance, :func:`distance`, as the LiteRT export does."""
        self.neither_threshold: float | None = None
        """Set (with ``domain_threshold``): it also returns P(neither), :func:`redness`, and refuses red photos."""
        self.explains = False
        """True (with ``domain_threshold``): it also returns an activation map, :func:`evidence`."""

    def resolve(self) -> tuple[str, str]:
        if self.fail:
            raise ConnectionError("registry unreachable")
        return self.version, f"run-{self.version}"

    def load(self, version: str, run_id: str) -> LoadedModel:
        self.loads += 1

        def forward(x: np.ndarray) -> np.ndarray:
            with self.lock:
                self.calls_per_batch.append(len(x))
            if self.poison_value is not None and np.any(x[:, 0, 0, 0] == self.poison_value):
                raise ValueError("poisoned input")
            probs = yellowness(x)
            probs[np.abs(x).max(axis=(1, 2, 3)) > 1e30] = np.nan  # as a real network overflows on absurd inputs
            if threshold is None:
                return probs
            columns = [probs, distance(x)[:, None]]
            if outputs is not None and outputs.neither is not None:
                columns.append(redness(x)[:, None])
            if outputs is not None and outputs.explain is not None:
                columns.append(evidence(x))
            return np.concatenate(columns, axis=1)

        threshold = self.domain_threshold
        outputs = None
        if threshold is not None and (self.neither_threshold is not None or self.explains):
            neither = len(LABELS) + 1 if self.neither_threshold is not None else None
            explain = len(LABELS) + 1 + (neither is not None) if self.explains else None
            outputs = Outputs(len(LABELS), neither, explain, EXPLAIN_GRID if self.explains else 0)
        return LoadedModel(
            name="fake-model",
            version=version,
            alias="champion",
            run_id=run_id,
            labels=LABELS,
            forward=forward,
            metadata=dict(self.metadata),
            domain_threshold=threshold,
            outputs=outputs,
            neither_threshold=self.neither_threshold,
        )
