"""Confidence that means what it says: the served probabilities are calibrated on out-of-fold answers.

The head's two-class softmax is refitted on cross-validated logits (every photo answered by a head that never saw
it) with one of two one-line maps, chosen by cross-validated log loss on those same answers: temperature scaling
(the logits divided by ``T``) or Platt scaling (``a`` times the logit difference plus ``b``). Either folds into
the served softmax layer, so ``/invocations``, ``/predict``, the LiteRT export and ``mlflow models serve`` all
answer the calibrated probabilities.

``low_confidence`` then has a stated meaning: an answer is "not sure" when its calibrated confidence is below the
point where answers stop being right 9 times in 10, read off the out-of-fold reliability curve (isotonic, so
monotone); with well calibrated probabilities that is close to 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.trainer.head import two_class

RIGHT_AT_LEAST = 0.9
"""Answers below the low-confidence threshold are right less often than this."""
ECE_BINS = 5
"""Bins of the expected calibration error, over confidences [0.5, 1] (as the trust issue measured it)."""


@dataclass(frozen=True, slots=True)
class Calibration:
    method: str
    """``temperature`` or ``platt``."""
    scale: float
    """Multiplies both logits (1 / temperature)."""
    shift: float
    """Added to the second class's logit (0 for temperature scaling)."""
    log_loss: dict[str, float]
    """Cross-validated log loss of each method (and of none), on the out-of-fold answers."""

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the two classes from their logits ``(n, 2+)``."""
        return two_class(logits, self.scale, self.shift)


def _nll(z: np.ndarray, y: np.ndarray, scale: float, shift: float) -> float:
    d = (z[:, 1] - z[:, 0]) * scale + shift  # logit of the second class
    signed = np.where(y == 1, d, -d)
    return float(np.mean(np.logaddexp(0.0, -signed)))


def _fit(method: str, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize, minimize_scalar

    if method == "none":
        return 1.0, 0.0
    if method == "temperature":
        found = minimize_scalar(lambda s: _nll(z, y, np.exp(s), 0.0), bounds=(-4, 4), method="bounded")
        return float(np.exp(found.x)), 0.0
    found = minimize(lambda p: _nll(z, y, np.exp(p[0]), p[1]), np.zeros(2), method="Nelder-Mead")
    return float(np.exp(found.x[0])), float(found.x[1])


def fit(logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> Calibration:
    """The calibration map for out-of-fold two-class ``logits`` ``(n, 2+)`` of photos of class ``y`` (0 or 1)."""
    z = np.asarray(logits, np.float64)[:, :2]
    y = np.asarray(y)
    order = np.random.default_rng(seed).permutation(len(y))
    losses: dict[str, float] = {}
    for method in ("none", "temperature", "platt"):
        total = 0.0
        for held in np.array_split(order, folds):
            rest = np.setdiff1d(order, held)
            scale, shift = _fit(method, z[rest], y[rest])
            total += _nll(z[held], y[held], scale, shift) * len(held)
        losses[method] = total / len(y)
    # Platt's extra parameter must earn its place: it wins only when clearly better than a temperature.
    method = "platt" if losses["platt"] < losses["temperature"] - 0.002 else "temperature"
    scale, shift = _fit(method, z, y)
    return Calibration(method, scale, shift, losses)


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Weighted gap between confidence and accuracy over ``bins`` bins of confidence in [0.5, 1]."""
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == y
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.mean() * abs(confidence[members].mean() - right[members].mean())
    return float(gap)


def brier(probabilities: np.ndarray, y: np.ndarray) -> float:
    truth = np.eye(probabilities.shape[1])[y]
    return float(np.mean(np.sum((probabilities - truth) ** 2, axis=1)))


def low_confidence_threshold(probabilities: np.ndarray, y: np.ndarray, floor: float = 0.6) -> float:
    """The confidence below which answers are right less than :data:`RIGHT_AT_LEAST` of the time, on the isotonic
    reliability curve of these (calibrated, out-of-fold) answers; :data:`RIGHT_AT_LEAST` itself when the curve
    never crosses it inside [floor, 0.99]."""
    from sklearn.isotonic import IsotonicRegression

    confidence = probabilities.max(axis=1)
    right = (probabilities.argmax(axis=1) == y).astype(float)
    if len(y) < 50 or right.all():
        return RIGHT_AT_LEAST
    curve = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(confidence, right)
    grid = np.linspace(floor, 0.99, 391)
    above = np.flatnonzero(curve.predict(grid) >= RIGHT_AT_LEAST)
    return float(grid[above[0]]) if len(above) else RIGHT_AT_LEAST


@dataclass(frozen=True, slots=True)
class Reliability:
    """Out-of-fold answers binned by confidence: what the reliability diagram shows."""

    edges: tuple[float, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    counts: tuple[int, ...]


def reliability(probabilities: np.ndarray, y: np.ndarray, bins: int = 10) -> Reliability:
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == y
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    conf, acc, counts = [], [], []
    for b in range(bins):
        members = which == b
        counts.append(int(members.sum()))
        conf.append(float(confidence[members].mean()) if members.any() else float("nan"))
        acc.append(float(right[members].mean()) if members.any() else float("nan"))
    return Reliability(tuple(float(e) for e in edges), tuple(conf), tuple(acc), tuple(counts))


def plot(before: Reliability, after: Reliability, ece: tuple[float, float], path: Path) -> None:
    """``report/reliability.png``: observed accuracy against confidence, before and after calibration, with
    the number of answers in each bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), dpi=100, height_ratios=(3, 1), sharex=True)
    top.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="perfect calibration")
    top.plot(before.confidence, before.accuracy, "o--", label=f"head (ECE {ece[0]:.3f})")
    top.plot(after.confidence, after.accuracy, "o-", label=f"calibrated (ECE {ece[1]:.3f})")
    top.set_ylabel("observed accuracy")
    top.set_ylim(0.4, 1.02)
    top.set_title("reliability (cross-validated answers, dandelion/grass photos)")
    top.legend(fontsize=8, loc="lower right")
    centres = (np.array(after.edges[:-1]) + np.array(after.edges[1:])) / 2
    width = (after.edges[1] - after.edges[0]) * 0.8
    bottom.bar(centres, after.counts, width=width, color="tab:orange")
    for x, n in zip(centres, after.counts, strict=True):
        bottom.text(x, n, str(n), ha="center", va="bottom", fontsize=7)
    bottom.set_xlabel("confidence (calibrated)")
    bottom.set_ylabel("answers")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
