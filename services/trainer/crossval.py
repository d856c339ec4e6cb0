"""The honest estimate: k-fold cross-validation of the whole recipe, on every photo or a planned sample.

A 48-photo test split said 93.75 % for a model that was right on 80 % of new photos, so every run judges its
recipe by cross-validation: each fold's head is fitted without the fold's photos (and its in-domain bank and
distance threshold made without them), and answers them. The out-of-fold answers are what calibration is fitted
on and what every estimate is read from: accuracy and recall per class, per source, at 128 px; how many real photos
are flagged "neither"; how many refused photos (daisies, ...) and out-of-domain images are caught.

The cost is planned (:func:`plan`, said in the run's log): with up to :data:`NESTED_UP_TO` photos the head's
regularisation is chosen again inside each fold and the folds are shuffled ``cv_repeats`` times, as before; with
more, C is chosen once on the training split and one shuffle is run (its spread is below the estimate's standard
error by then); beyond :data:`embeddings.EVALUATION_PHOTOS` photos, a hash-selected sample of that many is judged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.trainer import embeddings, head, indomain
from services.trainer.dataset import TrainingData
from shared.labels import LABELS

NESTED_UP_TO = 600
"""Photos up to which C is chosen again inside each fold and the folds are shuffled several times."""


@dataclass(frozen=True, slots=True)
class Plan:
    photos: int
    """Photos judged."""
    of: int
    folds: int
    repeats: int
    nested: bool

    def describe(self) -> str:
        judged = f"all {self.of} photos"
        if self.photos < self.of:
            judged = f"a hash-selected sample of {self.photos} of {self.of} photos"
        shuffles = f" x {self.repeats} shuffles" if self.repeats > 1 else ""
        how = "C chosen again inside each fold" if self.nested else "C chosen once on the training split"
        error = math.sqrt(0.04 * 0.96 / max(self.photos, 1))
        return f"{self.folds}-fold cross-validation{shuffles} on {judged} ({how}; standard error ~{error:.1%})"


def plan(photos: int, folds: int, repeats: int) -> Plan:
    judged = min(photos, embeddings.EVALUATION_PHOTOS)
    nested = judged <= NESTED_UP_TO
    return Plan(judged, photos, folds, repeats if judged <= 2 * NESTED_UP_TO else 1, nested)


def sample_index(data: TrainingData, cap: int = embeddings.EVALUATION_PHOTOS) -> np.ndarray:
    """The photos cross-validation judges: all, or the hash-selected sample (the ones with a ``small`` view)."""
    fraction = embeddings.sample_fraction(len(data), cap)
    return np.array([i for i, sha in enumerate(data.sha256) if embeddings.in_sample(sha, fraction)], int)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Index arrays of ``folds`` test folds; within each class, a seeded shuffle dealt round-robin, so every class
    is spread evenly, however few photos it has (no fold count is lowered for a rare kind)."""
    assignment = np.empty(len(y), int)
    rng = np.random.default_rng(seed)
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(assignment == f) for f in range(folds)]


def rows_of(data: TrainingData, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's training rows of photos ``index`` (every training view), their classes and weights."""
    views = data.views[:, index]
    rows = views.reshape(-1, views.shape[-1])
    return rows, np.tile(data.y[index], views.shape[0]), np.tile(data.weights(index), views.shape[0])


def fit_head(data: TrainingData, index: np.ndarray, c: float, start: head.SoftmaxHead | None = None):
    rows, targets, weights = rows_of(data, index)
    return head.fit(rows, targets, data.classes, c, weights, start=start)


def served_accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits[:, : len(LABELS)].argmax(axis=1) == y)) if len(y) else float("nan")


def choose_c(
    data: TrainingData, index: np.ndarray, grid: Sequence[float], folds: int, seed: int
) -> tuple[float, dict[float, float]]:
    """The ``c`` of ``grid`` whose heads answer the photos of the two classes best, by ``folds``-fold
    cross-validation on ``index`` (ties: the stronger regularisation), and the accuracy of each."""
    tests = stratified_folds(data.y[index], folds, seed)
    curve: dict[float, float] = {}
    starts: list[head.SoftmaxHead | None] = [None] * folds
    for c in sorted(grid):  # from strong to weak regularisation, each fit warm-started from the previous C's
        right = total = 0
        for f, test in enumerate(tests):
            train = np.setdiff1d(np.arange(len(index)), test)
            fitted = fit_head(data, index[train], c, starts[f])
            starts[f] = fitted
            served = test[data.served[index[test]]]
            logits = fitted.logits(data.views[0, index[served]])
            right += int(np.sum(logits[:, : len(LABELS)].argmax(axis=1) == data.y[index[served]]))
            total += len(served)
        curve[c] = right / max(total, 1)
    best = max(sorted(grid), key=lambda c: (curve[c], -c))
    return best, curve


@dataclass
class OutOfFold:
    """Every judged photo's answers from the fold that did not see it (first shuffle), and the folds' figures."""

    index: np.ndarray
    """The judged photos (into the data)."""
    logits: np.ndarray
    small_logits: np.ndarray
    """NaN where the photo has no ``small`` view."""
    distance: np.ndarray
    small_distance: np.ndarray
    threshold: np.ndarray
    """The distance threshold of the fold that answered each photo."""
    fold_of: np.ndarray
    ood_logits: list[np.ndarray] = field(default_factory=list)
    ood_distance: list[np.ndarray] = field(default_factory=list)
    ood_threshold: list[float] = field(default_factory=list)
    fold_accuracies: list[float] = field(default_factory=list)
    recalls: list[list[float]] = field(default_factory=list)
    chosen_c: list[float] = field(default_factory=list)
    seconds: float = 0.0


def out_of_fold(
    data: TrainingData,
    ood_features: np.ndarray,
    the_plan: Plan,
    grid: Sequence[float],
    c: float,
    seed: int,
    k: int = indomain.K,
    cap: int = indomain.BANK_VIEWS,
) -> OutOfFold:
    index = sample_index(data)
    n, classes = len(index), len(data.classes)
    nan = np.full((n, classes), np.nan, np.float32)
    result = OutOfFold(index, nan.copy(), nan.copy(), np.zeros(n, np.float32), np.full(n, np.nan, np.float32),
                       np.zeros(n, np.float32), np.zeros(n, int))  # fmt: skip
    distance_rate, _ = indomain.rates(len(data.kinds) > 0)
    served_y = data.y[index]
    for shuffle in range(seed, seed + the_plan.repeats):
        correct = np.zeros(n, bool)
        judged = np.zeros(n, bool)
        for f, test in enumerate(stratified_folds(served_y, the_plan.folds, shuffle)):
            train = np.setdiff1d(np.arange(n), test)
            fold_c = choose_c(data, index[train], grid, the_plan.folds, shuffle)[0] if the_plan.nested else c
            fitted = fit_head(data, index[train], fold_c)
            result.chosen_c.append(fold_c)
            logits = fitted.logits(data.views[0, index[test]])
            served = data.served[index[test]]
            answers = logits[:, : len(LABELS)].argmax(axis=1)
            correct[test[served]] = answers[served] == served_y[test[served]]
            judged[test[served]] = True
            result.fold_accuracies.append(float(np.mean(answers[served] == served_y[test[served]])))
            if shuffle != seed:
                continue
            result.logits[test] = logits
            small = test[data.has_small[index[test]]]
            result.small_logits[small] = fitted.logits(data.small[index[small]])
            # The fold's own in-domain bank and distance threshold, from its training photos of the two classes.
            members = index[train][data.served[index[train]]]
            bank = indomain.bank_of(data.views[:, members], data.group[members], cap, shuffle)
            held = indomain.held_out_distances(data.views[:, members], data.group[members], k, cap, seed=shuffle)
            threshold = float(np.quantile(held, 1.0 - distance_rate))
            result.distance[test] = bank.distances(data.views[0, index[test]], k)
            result.small_distance[small] = bank.distances(data.small[index[small]], k)
            result.threshold[test] = threshold
            result.fold_of[test] = f
            result.ood_logits.append(fitted.logits(ood_features))
            result.ood_distance.append(bank.distances(ood_features, k))
            result.ood_threshold.append(threshold)
        result.recalls.append([float(correct[judged & (served_y == i)].mean()) for i in range(len(LABELS))])
    return result


LEARNING_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
"""Shares of each fold's training photos the learning curve fits on."""


@dataclass(frozen=True, slots=True)
class LearningPoint:
    photos: int
    """Training photos per fold (mean over the folds)."""
    accuracy: float
    """Accuracy on the held-out folds' photos of the two classes (mean over the folds)."""
    sd: float


def learning_curve(
    data: TrainingData, index: np.ndarray, c: float, folds: int, seed: int,
    fractions: Sequence[float] = LEARNING_FRACTIONS,
) -> list[LearningPoint]:  # fmt: skip
    """Does more data help? Cross-validated accuracy of heads fitted on a stratified share of each fold's
    training photos (the same held-out folds for every share, ``c`` fixed), for each of ``fractions``."""
    y = data.y[index]
    tests = stratified_folds(y, folds, seed)
    rng = np.random.default_rng(seed)
    orders = {cls: rng.permutation(np.flatnonzero(y == cls)) for cls in np.unique(y)}
    points = []
    for fraction in fractions:
        accuracies, sizes = [], []
        for test in tests:
            held = np.zeros(len(index), bool)
            held[test] = True
            train = np.concatenate([
                members[~held[members]][: max(1, math.ceil(fraction * np.count_nonzero(~held[members])))]
                for members in orders.values()
            ])  # fmt: skip
            fitted = fit_head(data, index[train], c)
            served = test[data.served[index[test]]]
            accuracies.append(served_accuracy(fitted.logits(data.views[0, index[served]]), y[served]))
            sizes.append(len(train))
        mean, sd = float(np.mean(accuracies)), float(np.std(accuracies))
        points.append(LearningPoint(round(float(np.mean(sizes))), mean, sd))
    return points
