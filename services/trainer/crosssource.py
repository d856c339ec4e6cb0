"""Estimates across sources: how the recipe does on photos unlike any it was trained on.

Cross-validation mixes every source into every fold, so it says how the model does on more photos *like* the
ones it has. A user's photos come from elsewhere. So every run also trains without one source's photos of a class
and judges it on them (when another source has that class: photos of dandelions from the flower set, judged by a
model that saw only the other set's dandelions), and trains without one refused kind and judges whether photos
of that kind are still refused (a flower it has never seen, as a user's buttercup would be). The thresholds are
the served model's; each held-out model has its own in-domain bank and distance threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from services.trainer import crossval, head, indomain
from services.trainer.dataset import TrainingData
from shared.labels import LABELS, NEITHER


@dataclass(frozen=True, slots=True)
class HeldOut:
    what: str
    """``dandelion/flowers`` (a source's photos of a class) or ``neither/daisy`` (a refused kind)."""
    photos: int
    right: float
    """Called the right class (sources), or flagged "neither" (kinds)."""
    flagged: float
    right_small: float
    photos_small: int


@dataclass
class CrossSource:
    sources: list[HeldOut] = field(default_factory=list)
    kinds: list[HeldOut] = field(default_factory=list)
    not_estimable: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for cell in self.sources:
            key = cell.what.replace("/", "_")
            values[f"xs_{key}_recall"] = cell.right
            values[f"xs_{key}_recall_small"] = cell.right_small
            values[f"xs_{key}_flagged"] = cell.flagged
        for cell in self.kinds:
            values[f"xk_{cell.what.split('/', 1)[1]}_caught"] = cell.right
            values[f"xk_{cell.what.split('/', 1)[1]}_caught_small"] = cell.right_small
        return values

    def summary(self) -> str:
        parts = [
            f"{c.what}: {c.right:.1%} right ({c.right_small:.1%} at 128 px), {c.flagged:.1%} flagged"
            for c in self.sources
        ]
        parts += [f"{c.what} never seen: {c.right:.1%} refused" for c in self.kinds]
        if not parts:
            return "cross-source: not estimable (" + "; ".join(self.not_estimable) + ")"
        return "cross-source (trained without them): " + "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "sources": [asdict(c) for c in self.sources],
            "kinds": [asdict(c) for c in self.kinds],
            "not_estimable": self.not_estimable,
        }


def _judge(
    data: TrainingData, train: np.ndarray, held: np.ndarray, c: float, neither_threshold: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit on ``train``; the held-out photos' served answers and flags, on the full and the small view."""
    fitted = crossval.fit_head(data, train, c)
    members = train[data.served[train]]
    rate, _ = indomain.rates(neither_threshold is not None)
    bank = indomain.bank_of(data.views[:, members], data.group[members], seed=seed)
    held_out = indomain.held_out_distances(data.views[:, members], data.group[members], seed=seed)
    threshold = float(np.quantile(held_out, 1 - rate))

    def answers(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = fitted.logits(features)
        flags = bank.distances(features) > threshold
        if neither_threshold is not None:
            flags |= head.neither_probability(logits) > neither_threshold
        return logits[:, : len(LABELS)].argmax(axis=1), flags

    small = held[data.has_small[held]]
    full_answers, full_flags = answers(data.views[0, held])
    small_answers, small_flags = answers(data.small[small]) if len(small) else (np.zeros(0, int), np.zeros(0, bool))
    return full_answers, full_flags, small_answers, small_flags


def estimate(
    data: TrainingData, index: np.ndarray, c: float, neither_threshold: float | None, seed: int = 0
) -> CrossSource:
    """Held-out sources and kinds among the photos ``index`` (the cross-validation's)."""
    result = CrossSource()
    label, origin, kind = data.label[index], data.origin[index], data.kind[index]
    for lab in LABELS:
        origins = sorted(set(origin[label == lab].tolist()))
        if len(origins) < 2:
            result.not_estimable.append(f"{lab}: one source only ({', '.join(origins) or 'none'})")
            continue
        for source in origins:
            held = index[(label == lab) & (origin == source)]
            train = index[~((label == lab) & (origin == source))]
            full, flags, small, _ = _judge(data, train, held, c, neither_threshold, seed)
            want = LABELS.index(lab)
            right_small = float(np.mean(small == want)) if len(small) else float("nan")
            cell = HeldOut(
                f"{lab}/{source}",
                len(held),
                float(np.mean(full == want)),
                float(np.mean(flags)),
                right_small,
                len(small),
            )
            result.sources.append(cell)
    kinds = sorted(set(kind[label == NEITHER].tolist()))
    for refused in kinds:
        held = index[(label == NEITHER) & (kind == refused)]
        train = index[~((label == NEITHER) & (kind == refused))]
        _, flags, _, small_flags = _judge(data, train, held, c, neither_threshold if len(kinds) > 1 else None, seed)
        caught, caught_small = float(np.mean(flags)), float(np.mean(small_flags)) if len(small_flags) else float("nan")
        result.kinds.append(HeldOut(f"{NEITHER}/{refused}", len(held), caught, caught, caught_small, len(small_flags)))
    return result
