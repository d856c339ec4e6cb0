"""Class names in model-output order, and the mapping from model output to a label.

The order here is the contract: the trainer builds its targets from it, the exported model's output
column ``i`` is the probability of ``LABELS[i]``, and the order is logged with every model version so a
served model never depends on how a folder happened to be listed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LABELS: tuple[str, ...] = ("dandelion", "grass")
NEITHER = "neither"
"""The label of photos that are neither dandelions nor grass (other flowers, anything else): the model learns to
refuse them. Never a served class: ``/invocations`` and ``/predict`` keep the two columns of :data:`LABELS`, and
a photo that looks like these is answered with ``in_domain: false``."""
TRAINING_LABELS: tuple[str, ...] = (*LABELS, NEITHER)
"""Every label an ingested photo may carry."""


class UnknownLabelError(ValueError):
    """A label that is not one of the classes the product knows."""


def label_index(label: str, labels: Sequence[str] = LABELS) -> int:
    try:
        return list(labels).index(label)
    except ValueError:
        raise UnknownLabelError(f"unknown label {label!r}; expected one of {list(labels)}") from None


def decode(probabilities: np.ndarray, labels: Sequence[str] = LABELS) -> list[tuple[str, float, dict[str, float]]]:
    """Turn an ``(n, len(labels))`` probability matrix into ``(label, confidence, per-class)`` rows."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"expected shape (n, {len(labels)}), got {probs.shape}")
    best = probs.argmax(axis=1)
    return [
        (labels[int(i)], float(row[int(i)]), {name: float(p) for name, p in zip(labels, row, strict=True)})
        for i, row in zip(best, probs, strict=True)
    ]
