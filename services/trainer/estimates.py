"""The figures a run reports, read from its out-of-fold answers: every number here is on photos the answering
head, bank and thresholds did not see (:mod:`crossval`), except that the calibration and the P(neither) threshold
are fitted on those same answers (two and one parameters on thousands of answers: said in the model card).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.trainer import calibration, head
from services.trainer.calibration import Calibration
from services.trainer.crossval import OutOfFold, Plan
from services.trainer.dataset import TrainingData
from shared.labels import LABELS


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class Estimates:
    plan: Plan
    fold_accuracies: tuple[float, ...]
    recall: dict[str, float]
    by_group: dict[str, float]
    """Accuracy on the photos of each group of the two classes (``dandelion/flowers``, ...)."""
    small_accuracy: float
    small_recall: dict[str, float]
    small_photos: int
    calibration: Calibration
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    low_confidence_threshold: float
    low_confidence_share: float
    low_confidence_accuracy: float
    confident_accuracy: float
    flagged: float
    """Share of real photos (the two classes) flagged "neither", by either score."""
    flagged_by_group: dict[str, float]
    flagged_small: float
    caught: float
    """Share of the refused photos (daisies, ...) flagged."""
    caught_by_kind: dict[str, float]
    caught_small_by_kind: dict[str, float]
    trusted_wrong_by_kind: dict[str, float]
    """Refused photos answered in domain and confidently: what a user would take at face value."""
    ood_caught: float
    ood_auroc: float
    ood_images: int
    ood_missed: tuple[str, ...]
    chosen_c: tuple[float, ...] = field(default=())
    reliability_before: calibration.Reliability | None = None
    reliability_after: calibration.Reliability | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_accuracies))

    @property
    def sd(self) -> float:
        return float(np.std(self.fold_accuracies, ddof=1)) if len(self.fold_accuracies) > 1 else 0.0

    def metrics(self) -> dict[str, float]:
        values = {
            "cv_accuracy_mean": self.mean,
            "cv_accuracy_sd": self.sd,
            "cv_folds": float(self.plan.folds),
            "cv_repeats": float(self.plan.repeats),
            "cv_photos": float(self.plan.photos),
            "cv_accuracy_small": self.small_accuracy,
            "calibration_ece_before": self.ece_before,
            "calibration_ece_after": self.ece_after,
            "calibration_brier_before": self.brier_before,
            "calibration_brier_after": self.brier_after,
            "calibration_temperature": self.calibration.temperature,
            "calibration_shift": self.calibration.shift,
            "low_confidence_threshold": self.low_confidence_threshold,
            "low_confidence_share": self.low_confidence_share,
            "low_confidence_accuracy": self.low_confidence_accuracy,
            "confident_accuracy": self.confident_accuracy,
            "domain_cv_flagged": self.flagged,
            "domain_cv_flagged_small": self.flagged_small,
            "domain_ood_caught": self.ood_caught,
            "domain_ood_auroc": self.ood_auroc,
            "domain_ood_images": float(self.ood_images),
        }
        values.update({f"cv_recall_{label}": value for label, value in self.recall.items()})
        values.update({f"cv_recall_{label}_small": value for label, value in self.small_recall.items()})
        values.update({f"cv_accuracy_{_key(group)}": value for group, value in self.by_group.items()})
        values.update({f"domain_cv_flagged_{_key(group)}": value for group, value in self.flagged_by_group.items()})
        if self.caught_by_kind:
            values["domain_neither_caught"] = self.caught
            values.update({f"domain_caught_{_key(kind)}": v for kind, v in self.caught_by_kind.items()})
            values.update({f"domain_caught_{_key(kind)}_small": v for kind, v in self.caught_small_by_kind.items()})
            values.update({f"domain_trusted_wrong_{_key(kind)}": v for kind, v in self.trusted_wrong_by_kind.items()})
        values.update({f"calibration_log_loss_{m}": v for m, v in self.calibration.log_loss.items()})
        return values

    def summary(self) -> list[str]:
        per_class = ", ".join(f"{label} {value:.1%}" for label, value in self.recall.items())
        lines = [
            f"{self.plan.describe()}: accuracy {self.mean:.1%} ± {self.sd:.1%} ({per_class}); at 128 px "
            f"{self.small_accuracy:.1%} ({self.small_photos} photos)",
            f"calibration ({self.calibration.method}, T={self.calibration.temperature:.2f}): expected calibration "
            f"error {self.ece_before:.3f} -> {self.ece_after:.3f}; 'not sure' below "
            f"{self.low_confidence_threshold:.2f}: "
            f"{self.low_confidence_share:.1%} of answers",
            f"neither: {self.flagged:.1%} of real photos flagged; {self.ood_caught:.1%} of {self.ood_images} "
            f"out-of-domain images caught (AUROC {self.ood_auroc:.3f})"
            + (
                "; refused kinds caught: " + ", ".join(f"{k} {v:.1%}" for k, v in self.caught_by_kind.items())
                if self.caught_by_kind
                else ""
            ),
        ]
        return lines


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.replace("/", "_"))


def estimate(
    data: TrainingData, oof: OutOfFold, plan: Plan, neither_threshold: float | None, ood_names: list[str]
) -> Estimates:
    """Every figure of the run from the out-of-fold answers (``neither_threshold``: the served one)."""
    from sklearn.metrics import roc_auc_score

    index = oof.index
    y = data.y[index]
    served = data.served[index]
    groups = data.group[index]
    kinds = data.classes[len(LABELS) :]

    fit_on = served & np.isfinite(oof.logits[:, 0])
    cal = calibration.fit(oof.logits[fit_on], y[fit_on])
    before = head.two_class(oof.logits[fit_on])
    after = cal.apply(oof.logits[fit_on])
    threshold = calibration.low_confidence_threshold(after, y[fit_on])
    confidence = after.max(axis=1)
    right = after.argmax(axis=1) == y[fit_on]
    unsure = confidence < threshold

    answers = oof.logits[:, : len(LABELS)].argmax(axis=1)
    has_small = np.isfinite(oof.small_logits[:, 0])
    small_answers = np.where(has_small, np.nan_to_num(oof.small_logits[:, : len(LABELS)]).argmax(axis=1), -1)
    neither = head.neither_probability(oof.logits)
    small_neither = head.neither_probability(np.nan_to_num(oof.small_logits))
    flagged = oof.distance > oof.threshold
    flagged_small = oof.small_distance > oof.threshold
    if neither_threshold is not None:
        flagged |= neither > neither_threshold
        flagged_small |= small_neither > neither_threshold
    calibrated_all = cal.apply(oof.logits)
    trusted = (~flagged) & (calibrated_all.max(axis=1) >= threshold)

    ood_flags = []
    for logits, distance, fold_threshold in zip(oof.ood_logits, oof.ood_distance, oof.ood_threshold, strict=True):
        flags = distance > fold_threshold
        if neither_threshold is not None:
            flags |= head.neither_probability(logits) > neither_threshold
        ood_flags.append(flags)
    caught_by = np.mean(ood_flags, axis=0) if ood_flags else np.zeros(0)
    ood_mean_distance = np.mean(oof.ood_distance, axis=0) if oof.ood_distance else np.zeros(0)
    auroc = float("nan")
    if len(ood_mean_distance) and served.any():
        truth = np.r_[np.zeros(served.sum()), np.ones(len(ood_mean_distance))]
        auroc = float(roc_auc_score(truth, np.r_[oof.distance[served], ood_mean_distance]))

    recalls = np.array(oof.recalls)
    return Estimates(
        plan=plan,
        fold_accuracies=tuple(oof.fold_accuracies),
        recall={label: float(recalls[:, i].mean()) for i, label in enumerate(LABELS)},
        by_group={g: _mean(answers[(groups == g)] == y[(groups == g)]) for g in np.unique(groups[served])},
        small_accuracy=_mean(small_answers[served & has_small] == y[served & has_small]),
        small_recall={label: _mean(small_answers[has_small & (y == i)] == i) for i, label in enumerate(LABELS)},
        small_photos=int((served & has_small).sum()),
        calibration=cal,
        ece_before=calibration.expected_calibration_error(before, y[fit_on]),
        ece_after=calibration.expected_calibration_error(after, y[fit_on]),
        brier_before=calibration.brier(before, y[fit_on]),
        brier_after=calibration.brier(after, y[fit_on]),
        low_confidence_threshold=threshold,
        low_confidence_share=float(unsure.mean()),
        low_confidence_accuracy=_mean(right[unsure]),
        confident_accuracy=_mean(right[~unsure]),
        flagged=_mean(flagged[served]),
        flagged_by_group={g: _mean(flagged[served & (groups == g)]) for g in np.unique(groups[served])},
        flagged_small=_mean(flagged_small[served & has_small]),
        caught=_mean(flagged[~served]),
        caught_by_kind={k: _mean(flagged[y == len(LABELS) + i]) for i, k in enumerate(kinds)},
        caught_small_by_kind={k: _mean(flagged_small[(y == len(LABELS) + i) & has_small]) for i, k in enumerate(kinds)},
        trusted_wrong_by_kind={k: _mean(trusted[y == len(LABELS) + i]) for i, k in enumerate(kinds)},
        ood_caught=_mean(caught_by),
        ood_auroc=auroc,
        ood_images=len(caught_by),
        ood_missed=tuple(name for name, share in zip(ood_names, caught_by, strict=True) if share < 0.5),
        chosen_c=tuple(oof.chosen_c),
        reliability_before=calibration.reliability(before, y[fit_on]),
        reliability_after=calibration.reliability(after, y[fit_on]),
    )


def neither_held_out(data: TrainingData, oof: OutOfFold) -> tuple[np.ndarray, np.ndarray] | None:
    """Out-of-fold P(neither) of the judged photos of the two classes, and their groups: what the served
    P(neither) threshold is set on (None when the head learnt no refused kind)."""
    if not data.kinds:
        return None
    served = data.served[oof.index]
    return head.neither_probability(oof.logits[served]), data.group[oof.index][served]
