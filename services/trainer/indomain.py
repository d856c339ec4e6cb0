""" "Neither": whether a photo is like the dandelion and grass photos the model was trained on.

Two scores, one verdict: a photo is out of domain when either says so.

* **Distance** (anything unlike the training photos: a cat, a chart, a receipt): the cosine distance from the
  photo's pooled backbone features to its ``k``-th nearest view in a *bank* of training views (the photos of the
  two classes and their mirror images). The bank is a stratified sample of at most :data:`BANK_VIEWS` views, each
  standing for the views it was drawn from, so ``k`` counts views of the whole training set (``ceil(k * bank /
  views)`` bank entries): the served model's size does not grow with the data. ImageNet features put a cat or a
  receipt far from every lawn and every dandelion, and asking for the 20th view asks whether the photo is close to
  *many* training photos, which one odd training photo cannot answer for it.
* **P(neither)** (things close to the photos, that are not them: daisies, sunflowers, tulips, roses): the share of
  the refused kinds in the head's softmax (:mod:`head`), learnt from the ``neither`` photos of the sources. Absent
  when the sources have none.

Thresholds are set on photos the bank or the head did not see, so that a stated share of real dandelion and
grass photos is flagged: :data:`FLAG_RATE` by the distance alone when there is no ``neither`` photo, else
:data:`DISTANCE_RATE` by distance (over all held-out photos) and :data:`NEITHER_RATE` by P(neither) (in every
group of photos, a class and its source, so that no source pays for another's). How the method and the numbers
were chosen, by cross-validation on both photo sources and an out-of-domain set: docs/model.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

K = 20
"""Training views the distance is measured to (the ``k``-th nearest)."""
BANK_VIEWS = 512
"""Most views the served model carries (2.6 MB): a stratified sample beyond it."""
FLAG_RATE = 0.025
"""Share of real photos flagged by the distance when the sources hold no ``neither`` photo."""
DISTANCE_RATE = 0.02
NEITHER_RATE = 0.02
"""With ``neither`` photos: the shares of real photos (in each group) each score may flag."""
FOLDS = 5


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Bank:
    """Unit-length feature rows and how many training views they stand for."""

    rows: np.ndarray
    represented: int

    def entries_for(self, k: int) -> int:
        """Bank entries that stand for ``k`` training views."""
        return max(1, min(len(self.rows), math.ceil(k * len(self.rows) / max(self.represented, 1))))

    def distances(self, features: np.ndarray, k: int = K) -> np.ndarray:
        """Cosine distance of each row of ``features`` ``(n, d)`` to its ``k``-th nearest training view."""
        entries = self.entries_for(k)
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), 4096):
            similarities = normalised(features[start : start + 4096]) @ self.rows.T
            out[start : start + 4096] = 1.0 - np.partition(similarities, -entries, axis=1)[:, -entries]
        return out


def bank_of(views: np.ndarray, groups: np.ndarray, cap: int = BANK_VIEWS, seed: int = 0) -> Bank:
    """The bank of ``views`` ``(V, n, d)`` of ``n`` photos in ``groups``: every view, or a sample of ``cap`` drawn
    from each group in proportion to its size (deterministic for the same photos and seed)."""
    n_views, n = views.shape[0], views.shape[1]
    total = n_views * n
    if total <= cap:
        return Bank(normalised(views.reshape(total, -1)), total)
    rng = np.random.default_rng(seed)
    per_view_groups = np.tile(groups, n_views)
    chosen = []
    for group in np.unique(groups):
        members = np.flatnonzero(per_view_groups == group)
        take = max(1, round(cap * len(members) / total))
        chosen.append(rng.choice(members, min(take, len(members)), replace=False))
    rows = np.sort(np.concatenate(chosen))
    flat = views.reshape(total, -1)
    return Bank(normalised(flat[rows]), total)


def held_out_distances(
    views: np.ndarray, groups: np.ndarray, k: int = K, cap: int = BANK_VIEWS, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """Distance of each photo's first view to a bank of the other folds' photos (the bank it would meet served)."""
    n = views.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    result = np.empty(n, np.float32)
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(np.arange(n), fold)
        result[fold] = bank_of(views[:, rest], groups[rest], cap, seed).distances(views[0, fold], k)
    return result


def group_quantile(values: np.ndarray, groups: np.ndarray, rate: float, min_group: int | None = None) -> float:
    """The smallest threshold that flags at most ``rate`` of all the values and of every group large enough to be
    judged alone (``min_group`` values, default: enough for ``rate`` to be two of them). A smaller group is judged
    with everything: its ``1 - rate`` quantile would be its one or two most unusual photos (a 40-photo source's
    one daisy-like dandelion would set the bar for every photo)."""
    min_group = math.ceil(2 / rate) if min_group is None else min_group
    thresholds = [float(np.quantile(values, 1.0 - rate))]
    for g in np.unique(groups):
        members = values[groups == g]
        if len(members) >= min_group:
            thresholds.append(float(np.quantile(members, 1.0 - rate)))
    return max(thresholds)


@dataclass(frozen=True)
class DomainModel:
    """What a model version carries to say "in domain or not"."""

    bank: Bank
    k: int
    threshold: float
    """Distance above which a photo is flagged."""
    neither_threshold: float | None
    """P(neither) above which a photo is flagged; None when the head learnt no refused kind."""
    distance_rate: float
    neither_rate: float | None
    calibration_photos: int
    refused_kinds: tuple[str, ...] = ()

    def distances(self, features: np.ndarray) -> np.ndarray:
        return self.bank.distances(features, self.k)

    def flagged(self, distances: np.ndarray, neither: np.ndarray | None) -> np.ndarray:
        out = distances > self.threshold
        if self.neither_threshold is not None and neither is not None:
            out |= neither > self.neither_threshold
        return out

    def metadata(self) -> dict[str, object]:
        """What the model's MLflow metadata says (the API reads the thresholds and the output columns)."""
        return {
            "method": "cosine distance to the k-th nearest training view (pooled backbone features), and the "
            "head's P(neither) where it learnt kinds of photos to refuse",
            "k": self.k,
            "threshold": float(self.threshold),
            "flag_rate": self.distance_rate,
            "neither_threshold": None if self.neither_threshold is None else float(self.neither_threshold),
            "neither_flag_rate": self.neither_rate,
            "refused_kinds": list(self.refused_kinds),
            "bank_views": len(self.bank.rows),
            "bank_represents_views": self.bank.represented,
            "bank_entries_for_k": self.bank.entries_for(self.k),
            "calibration_photos": self.calibration_photos,
        }


def rates(has_neither: bool) -> tuple[float, float | None]:
    return (DISTANCE_RATE, NEITHER_RATE) if has_neither else (FLAG_RATE, None)


def fit(
    train_views: np.ndarray,
    train_groups: np.ndarray,
    val_first_view: np.ndarray,
    neither_held_out: tuple[np.ndarray, np.ndarray] | None,
    refused_kinds: tuple[str, ...] = (),
    k: int = K,
    cap: int = BANK_VIEWS,
    seed: int = 0,
) -> DomainModel:
    """The bank of the training split's photos of the two classes (``train_views`` ``(V, n, d)``), the distance
    threshold from photos the bank does not hold (each training photo against a bank without its fold, and the
    validation split against the bank), and the P(neither) threshold from held-out P(neither) of photos of the two
    classes (``neither_held_out``: values and groups, from cross-validation)."""
    distance_rate, neither_rate = rates(neither_held_out is not None)
    bank = bank_of(train_views, train_groups, cap, seed)
    held = [held_out_distances(train_views, train_groups, k, cap, seed=seed)]
    if len(val_first_view):
        held.append(bank.distances(val_first_view, k))
    distances = np.concatenate(held)
    threshold = float(np.quantile(distances, 1.0 - distance_rate))
    neither_threshold = None
    if neither_held_out is not None:
        neither_threshold = group_quantile(neither_held_out[0], neither_held_out[1], neither_rate)
    return DomainModel(
        bank, k, threshold, neither_threshold, distance_rate, neither_rate, len(distances), refused_kinds
    )
