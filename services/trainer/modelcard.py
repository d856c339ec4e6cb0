"""``model_card.md``: what a registered version is, what it is for, and the evidence, written from its run.

Every figure comes from the run's own logged metrics (the table names the metric it shows, so a reader, or a test,
can check each one against MLflow), never typed by hand. Logged with every run (``model_card.md``), served by the
API at ``GET /model/card``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from shared.labels import LABELS

REPOSITORY = Path(__file__).resolve().parents[2]


def revision(configured: str | None = None) -> str:
    """The source revision the run came from: the configured one (images carry it), else ``git``'s (with
    ``+uncommitted changes`` when the code differs from it: that revision alone does not reproduce the run), else
    unknown."""
    if configured:
        return configured

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "services", "shared")
    dirty = changed is not None and changed.returncode == 0 and changed.stdout.strip()
    return head.stdout.strip() + (" +uncommitted changes" if dirty else "")


def percent(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value * 100:.1f} %"


def number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _row(figure: str, value: str, metric: str) -> str:
    return f"| {figure} | {value} | `{metric}` |"


def render(settings, run_id: str, version: str, feature_set, data, fitted, results, decision, params) -> str:
    """The card of ``version`` (``data``: :class:`dataset.TrainingData`; ``fitted``: :class:`train.Fitted`)."""
    est, domain, cross = fitted.estimates, fitted.domain, fitted.cross_source
    name = settings.registry.model_name
    by_class = json.loads(params["photos_by_class"])
    kinds = list(data.kinds)
    origins = sorted(set(data.origin.tolist()))
    lines = [
        f"# {name} v{version}",
        "",
        f"Run `{run_id}`, trained from feature set {feature_set.name} v{feature_set.version} "
        f"(snapshot `{feature_set.source_snapshot[:16]}`), source revision `{revision(settings.revision)}`.",
        "",
        "## What it is for",
        "",
        f"Telling photos of **{LABELS[0]}s** from photos of **{LABELS[1]}**, and saying when a photo is neither. "
        "Every answer carries the probabilities of the two classes (calibrated: an answer given at 0.8 is right about "
        f"8 times in 10) and `in_domain`: false when the photo is unlike the training photos"
        + (f" or looks like a kind of photo it learnt to refuse ({', '.join(kinds)})" if kinds else "")
        + ". An answer below a confidence of "
        f"{number(est.low_confidence_threshold, 2)} is marked `low_confidence` (answers that unsure are right less "
        "than 9 times in 10).",
        "",
        "Not for: other plants or flowers than those above (a flower it has never seen may pass as a dandelion: see "
        "the cross-source figures), lawn health, weeds in general, or any decision about a person.",
        "",
        "## Data",
        "",
        "| class or kind | photos |",
        "|---|---|",
        *[f"| {cls} | {count} |" for cls, count in by_class.items()],
        "",
        f"Sources: {', '.join(origins)}. Splits (photos of the two classes): train {params['n_train']}, validation "
        f"{params['n_val']}, test {params['n_test']}; refused kinds are split the same way and only judged, never "
        "served as a class.",
        "",
        "## Recipe",
        "",
        f"- Backbone: {params['backbone']} pretrained on ImageNet-1k, frozen, at {params['resolution']} px "
        f"(embeddings `{params['embedding_spec']}`).",
        f"- Head: multinomial logistic regression over {', '.join(data.classes)}; C = {fitted.c:g} chosen by "
        "cross-validation on the training split; classes weighted evenly, sources evenly within a class.",
        f"- Calibration: {est.calibration.method} (T = {number(est.calibration.temperature, 3)}, shift "
        f"{number(est.calibration.shift, 3)}), fitted on cross-validated answers, folded into the served layer.",
        f"- Neither: cosine distance to the {domain.k}th nearest training view (bank of {len(domain.bank.rows)} "
        f"views standing for {domain.bank.represented}), threshold {number(domain.threshold, 4)}"
        + (f"; P(neither) above {number(domain.neither_threshold, 4)}" if domain.neither_threshold is not None else "")
        + ".",
        "",
        "## Evidence",
        "",
        f"Cross-validation: {est.plan.describe()}. Every figure below is on photos the answering model did not see, "
        "except the calibration map and the P(neither) threshold, fitted on those same cross-validated answers.",
        "",
        "| figure | value | metric |",
        "|---|---|---|",
        _row("accuracy, cross-validated (mean over folds)", percent(results["cv_accuracy_mean"]), "cv_accuracy_mean"),
        _row("spread over folds (sd)", percent(results["cv_accuracy_sd"]), "cv_accuracy_sd"),
        *[_row(f"recall, {label}", percent(results[f"cv_recall_{label}"]), f"cv_recall_{label}") for label in LABELS],
        _row("accuracy at 128 px", percent(results["cv_accuracy_small"]), "cv_accuracy_small"),
        *[
            _row(f"accuracy, {group}", percent(value), f"cv_accuracy_{group.replace('/', '_')}")
            for group, value in est.by_group.items()
        ],
        _row("calibration error (ECE), head", number(results["calibration_ece_before"]), "calibration_ece_before"),
        _row("calibration error (ECE), served", number(results["calibration_ece_after"]), "calibration_ece_after"),
        _row("Brier score, calibrated", number(results["calibration_brier_after"]), "calibration_brier_after"),
        _row("answers marked low_confidence", percent(results["low_confidence_share"]), "low_confidence_share"),
        _row("accuracy of those answers", percent(results["low_confidence_accuracy"]), "low_confidence_accuracy"),
        _row("real photos flagged neither", percent(results["domain_cv_flagged"]), "domain_cv_flagged"),
        *[
            _row(f"refused {kind} caught", percent(results[f"domain_caught_{kind}"]), f"domain_caught_{kind}")
            for kind in kinds
        ],
        _row(f"other images caught ({est.ood_images})", percent(results["domain_ood_caught"]), "domain_ood_caught"),
        _row("test split accuracy", percent(results["test_accuracy"]), "test_accuracy"),
        _row("test split ROC AUC", number(results["test_roc_auc"]), "test_roc_auc"),
        "",
        "Across sources (trained without them):",
        "",
        *_cross_lines(cross),
        "",
        "## Known failure modes",
        "",
        *_failures(data, fitted, results),
        "",
        "## The gate",
        "",
        f"{'Promoted' if decision.promote else 'Not promoted'}: {decision.reason}.",
        "",
        "## Reproduce",
        "",
        "```",
        f"git checkout {revision(settings.revision).split()[0]}",
        f"TRAINER_SEED={settings.seed} python -m services.trainer train --feature-set {feature_set.version}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _cross_lines(cross) -> list[str]:
    lines = [
        f"- {cell.what}: {percent(cell.right)} right, {percent(cell.right_small)} at 128 px, "
        f"{percent(cell.flagged)} flagged ({cell.photos} photos)"
        for cell in cross.sources
    ]
    lines += [f"- {c.what}, never seen: {percent(c.right)} refused ({c.photos} photos)" for c in cross.kinds]
    return lines + [f"- not estimable: {note}" for note in cross.not_estimable]


def _failures(data, fitted, results) -> list[str]:
    test = data.where("test")
    served = test[data.served[test]]
    probs = fitted.head.probabilities(data.views[0, served])
    wrong = np.flatnonzero(probs.argmax(axis=1) != data.y[served])
    lines = [
        f"- a {data.group[served[i]]} photo (`{data.object_key[served[i]].rsplit('/', 1)[-1][:16]}`) answered "
        f"{LABELS[int(probs[i].argmax())]} at {percent(float(probs[i].max()))}"
        for i in wrong[:12]
    ]
    if not lines:
        lines = ["- no test photo of the two classes was answered wrong"]
    missed = fitted.estimates.ood_missed
    if missed:
        lines.append(f"- out-of-domain images most folds took for real photos: {', '.join(missed[:12])}")
    weakest = sorted(fitted.estimates.caught_by_kind.items(), key=lambda item: item[1])[:1]
    for kind, caught in weakest:
        lines.append(f"- {kind}: {percent(1 - caught)} of them pass as real photos (the hardest refused kind)")
    return lines
