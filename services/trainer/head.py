"""The classifier on the frozen backbone: a multinomial logistic regression on standardised pooled features.

Its outputs are the two served classes (dandelion, grass) followed by one per kind of photo the model learns to
refuse (daisy, rose, ...: the ``neither`` photos, by subfolder). Learning each kind on its own gives the linear
head one direction per kind instead of one for a mixed bag, which caught more daisies and sunflowers at the same
cost to real photos (docs/model.md). What is served comes from these logits:

* the probabilities of the two classes: a softmax over their two logits, calibrated (:mod:`calibration`): one
  softmax ``Dense`` layer, the standardisation and the calibration folded in;
* ``P(neither)``: one minus the two classes' share of the softmax over all the logits;
* the class activation map: the logit difference of the two classes at each cell of the backbone's last
  feature map (exact for a linear head on average-pooled features).

Fitted by L-BFGS on the objective scikit-learn's ``LogisticRegression`` minimises (``C`` times the weighted
cross-entropy plus half the squared weights, the intercept unpenalised), computed over row blocks straight from
the float16 embedding matrix: no standardised or float64 copy of the data is made, so memory stays the matrix
plus a block. Deterministic: the same data gives the same head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

C_GRID = (0.001, 0.003, 0.01, 0.03)
"""Inverse regularisation strengths tried (standardised 1280-d features, sample weights of mean 1)."""
BLOCK_ROWS = 8192
"""Rows per block when the data is too large to cast to float32 whole (:data:`WHOLE_BYTES`)."""
WHOLE_BYTES = 256 * 1024 * 1024


class HeadError(RuntimeError):
    """The head did not converge: it is not registered."""


@dataclass(frozen=True)
class SoftmaxHead:
    """``logits = ((features - mean) / scale) @ coef + intercept`` over :attr:`classes`; the first two are the
    served classes in :data:`shared.labels.LABELS` order."""

    classes: tuple[str, ...]
    coef: np.ndarray
    """``(features, classes)`` on standardised features."""
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    c: float
    calibration_scale: float = 1.0
    """Multiplies the two classes' logits before their softmax (1 / temperature: :mod:`calibration`)."""
    calibration_shift: float = 0.0
    """Added to the second class's logit after the scale (Platt scaling; 0 for a temperature)."""
    iterations: int = field(default=0, compare=False)

    def raw(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel ``(features, classes)`` and bias on unstandardised features (the standardisation folded in)."""
        kernel = self.coef / self.scale[:, None]
        return kernel.astype(np.float32), (self.intercept - self.mean @ kernel).astype(np.float32)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``(n, classes)`` logits of ``(n, features)`` (float16 or float32), computed block by block."""
        kernel, bias = self.raw()
        out = np.empty((len(features), len(self.classes)), np.float32)
        for start in range(0, len(features), BLOCK_ROWS):
            block = np.asarray(features[start : start + BLOCK_ROWS], np.float32)
            out[start : start + BLOCK_ROWS] = block @ kernel + bias
        return out

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The served, calibrated probabilities of the two classes: ``(n, 2)``."""
        return two_class(self.logits(features), self.calibration_scale, self.calibration_shift)

    def neither(self, features: np.ndarray) -> np.ndarray:
        """``P(neither)``: the share of every refused kind in the softmax over all the logits: ``(n,)``."""
        return neither_probability(self.logits(features))

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel ``(features, 2)`` and bias ``(2,)`` of the served softmax ``Dense`` layer (calibration in)."""
        kernel, bias = self.raw()
        bias = bias[:2] * self.calibration_scale + np.array([0.0, self.calibration_shift])
        return (kernel[:, :2] * self.calibration_scale).astype(np.float32), bias.astype(np.float32)

    def calibrated(self, scale: float, shift: float = 0.0) -> SoftmaxHead:
        return replace(self, calibration_scale=float(scale), calibration_shift=float(shift))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to apply this head again (saved with each run: the gate re-scores a champion from
        cached embeddings with it)."""
        return {
            "classes": np.array(self.classes),
            "coef": self.coef,
            "intercept": self.intercept,
            "mean": self.mean,
            "scale": self.scale,
            "c": np.array(self.c),
            "calibration": np.array([self.calibration_scale, self.calibration_shift]),
        }

    @classmethod
    def from_arrays(cls, arrays) -> SoftmaxHead:
        return cls(
            tuple(str(c) for c in arrays["classes"]),
            np.asarray(arrays["coef"]),
            np.asarray(arrays["intercept"]),
            np.asarray(arrays["mean"]),
            np.asarray(arrays["scale"]),
            float(arrays["c"]),
            *(float(v) for v in arrays["calibration"]),
        )


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def two_class(logits: np.ndarray, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    z = np.asarray(logits, np.float64)[:, :2] * scale
    z[:, 1] += shift
    return softmax(z)


def neither_probability(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] <= 2:
        return np.zeros(len(logits))
    return 1.0 - softmax(logits)[:, :2].sum(axis=1)


def _moments(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation of the rows of ``x``, in float64, by blocks."""
    total = weights.sum()
    first = np.zeros(x.shape[1])
    second = np.zeros(x.shape[1])
    for start in range(0, len(x), BLOCK_ROWS):
        block = np.asarray(x[start : start + BLOCK_ROWS], np.float64)
        w = weights[start : start + BLOCK_ROWS, None]
        first += (block * w).sum(axis=0)
        second += (block * block * w).sum(axis=0)
    mean = first / total
    return mean, np.sqrt(np.maximum(second / total - mean * mean, 0.0)) + 1e-6


def fit(
    rows: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    c: float,
    weights: np.ndarray | None = None,
    *,
    start: SoftmaxHead | None = None,
    max_iterations: int = 2000,
) -> SoftmaxHead:
    """Fit on ``rows`` ``(n, features)`` (float16 or float32; every view of a photo is a row) with class indices
    ``targets`` and sample ``weights`` (scaled to mean 1). ``start`` warm-starts from another head's weights."""
    from scipy.optimize import minimize

    n, d = rows.shape
    k = len(classes)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    weights = weights * (n / weights.sum())
    whole = rows.nbytes * 2 <= WHOLE_BYTES
    data = np.asarray(rows, np.float32) if whole else rows
    mean, scale = (start.mean, start.scale) if start is not None else _moments(data, weights)
    inv_scale = 1.0 / scale
    shift = (mean * inv_scale).astype(np.float32)
    onehot_index = np.asarray(targets, np.int64)
    penalty = 1.0 / (c * n)  # sklearn's objective, divided by C * n

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef = theta[: d * k].reshape(d, k)
        intercept = theta[d * k :]
        kernel = (coef * inv_scale[:, None]).astype(np.float32)
        bias = intercept - shift.astype(np.float64) @ coef
        loss = 0.0
        grad_kernel = np.zeros((d, k))
        residual_sum = np.zeros(k)
        for s in range(0, n, BLOCK_ROWS):
            block = np.asarray(data[s : s + BLOCK_ROWS], np.float32)
            w = weights[s : s + BLOCK_ROWS]
            z = (block @ kernel).astype(np.float64) + bias
            z -= z.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(z).sum(axis=1))
            rows_index = np.arange(len(block))
            picked = z[rows_index, onehot_index[s : s + BLOCK_ROWS]]
            loss += float(np.sum(w * (log_norm - picked)))
            p = np.exp(z - log_norm[:, None])
            p[rows_index, onehot_index[s : s + BLOCK_ROWS]] -= 1.0
            p *= w[:, None]
            grad_kernel += (block.T @ p.astype(np.float32)).astype(np.float64)
            residual_sum += p.sum(axis=0)
        # d(loss)/d(coef) = inv_scale * (X^T R) - inv_scale * mean * sum(R): the standardisation applied lazily
        grad_coef = (grad_kernel - np.outer(mean, residual_sum)) * inv_scale[:, None]
        value = loss / n + 0.5 * penalty * float(np.sum(coef * coef))
        gradient = np.concatenate([(grad_coef / n + penalty * coef).ravel(), residual_sum / n])
        return value, gradient

    theta0 = np.zeros(d * k + k)
    if start is not None and start.coef.shape == (d, k):
        theta0 = np.concatenate([start.coef.ravel(), start.intercept])
    result = minimize(
        objective,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iterations, "gtol": 1e-6, "ftol": 1e-12, "maxcor": 20},
    )
    if not result.success and result.nit >= max_iterations:
        raise HeadError(f"the head did not converge in {max_iterations} iterations (C={c:g}): {result.message}")
    coef = result.x[: d * k].reshape(d, k)
    intercept = result.x[d * k :].copy()
    return SoftmaxHead(tuple(classes), coef, intercept, mean, scale, float(c), iterations=int(result.nit))
