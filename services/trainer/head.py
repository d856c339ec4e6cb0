"""The classifier on the frozen backbone: a logistic regression on standardised pooled features.

Training images contribute several *views* (the photo and its mirror image): each view is one training
row, and every split that cross-validates keeps the views of one photo together, so no photo is ever
judged by a head that saw its mirror image. The regularisation is chosen by cross-validation on the
training rows only. The fitted head, its standardisation folded in, becomes one Keras ``Dense`` layer
(:meth:`LinearHead.dense_weights`): the served model is the backbone plus that layer, nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.labels import LABELS

C_GRID = (0.001, 0.003, 0.01, 0.03)
"""Inverse regularisation strengths tried (on standardised 1280-d features, a few hundred photos)."""


@dataclass(frozen=True, slots=True)
class LinearHead:
    """``P(LABELS[1]) = sigmoid(((features - mean) / scale) @ coef + intercept)``."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    c: float

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """``(n, len(LABELS))`` in :data:`LABELS` order."""
        z = ((features - self.mean) / self.scale) @ self.coef + self.intercept
        second = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1.0 - second, second], axis=1)

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel ``(features, 2)`` and bias ``(2,)`` of a softmax ``Dense`` layer equal to this head.

        Softmax over ``(-z/2, z/2)`` is ``sigmoid(z)`` for the second class, and the standardisation is
        linear, so it folds into the kernel and bias exactly.
        """
        w = self.coef / self.scale
        b = self.intercept - float(np.sum(self.coef * self.mean / self.scale))
        kernel = np.stack([-w / 2, w / 2], axis=1).astype(np.float32)
        return kernel, np.array([-b / 2, b / 2], np.float32)


def fit(views: np.ndarray, y: np.ndarray, c: float) -> LinearHead:
    """Fit on ``views`` ``(n_photos, n_views, features)`` with labels ``y`` ``(n_photos,)``."""
    from sklearn.linear_model import LogisticRegression

    if len(LABELS) != 2:
        raise ValueError("the linear head is binary")
    x = views.reshape(-1, views.shape[-1]).astype(np.float64)
    labels = np.repeat(y, views.shape[1])
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head that did not converge is not registered
        model.fit((x - mean) / scale, labels)
    return LinearHead(model.coef_[0].copy(), float(model.intercept_[0]), mean, scale, c)


def predict(head: LinearHead, views: np.ndarray) -> np.ndarray:
    """Probabilities of each photo, averaged over its views ``(n_photos, n_views, features)``."""
    return np.mean([head.probabilities(views[:, v]) for v in range(views.shape[1])], axis=0)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Index arrays of ``folds`` test folds, each class spread evenly, shuffled by ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), y)]


def choose_c(
    views: np.ndarray,
    y: np.ndarray,
    grid: Sequence[float] = C_GRID,
    folds: int = 5,
    seed: int = 0,
    eval_views: int = 1,
) -> tuple[float, dict[float, float]]:
    """The ``c`` of ``grid`` with the best cross-validated accuracy on these photos (ties: the stronger
    regularisation, the smaller ``c``), and the accuracy of each. Held-out photos are judged on their
    first ``eval_views`` views, averaged (2: the photo and its mirror, as the model with test-time
    mirroring does)."""
    folds = max(2, min(folds, int(np.bincount(y).min())))
    tests = stratified_folds(y, folds, seed)
    curve = {}
    for c in grid:
        correct = 0
        for test in tests:
            train = np.setdiff1d(np.arange(len(y)), test)
            head = fit(views[train], y[train], c)
            correct += int(np.sum(predict(head, views[test][:, :eval_views]).argmax(axis=1) == y[test]))
        curve[c] = correct / len(y)
    best = max(grid, key=lambda c: (curve[c], -c))
    return best, curve
