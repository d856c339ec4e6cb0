"""Test-split metrics and the pictures people look at: confusion matrix, misclassified images, learning curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from shared.images import decode
from shared.labels import LABELS


def metrics(y_true: np.ndarray, probabilities: np.ndarray, prefix: str = "test_") -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, ROC AUC (grass as positive), log loss and the confusion cells."""
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(LABELS)))
    values = {
        "accuracy": accuracy_score(y_true, y_pred),
        "precision": precision_score(y_true, y_pred, average="macro", zero_division=0),
        "recall": recall_score(y_true, y_pred, average="macro", zero_division=0),
        "f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
        "roc_auc": roc_auc_score(y_true, probabilities[:, 1]) if len(set(y_true.tolist())) > 1 else float("nan"),
        "log_loss": log_loss(y_true, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=labels),
    }
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    for i, actual in enumerate(LABELS):
        for j, predicted in enumerate(LABELS):
            values[f"cm_{actual}_as_{predicted}"] = int(matrix[i, j])
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(LABELS))))
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(matrix, cmap="Greens")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=14, color="black" if n < matrix.max() / 2 else "white")
    ax.set_title("test split")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def misclassified_grid(
    images: Sequence[bytes], y_true: np.ndarray, probabilities: np.ndarray, path: Path, limit: int = 24
) -> int:
    """A grid of the wrongly classified test images, each titled with its true label, the model's answer and
    the model's confidence in that answer; returns how many there are. The grid is as wide as it needs."""
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y_true)
    shown = wrong[:limit]
    cols = max(1, min(6, len(shown)))
    rows = max(1, int(np.ceil(len(shown) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols * 2.2, 4.4), rows * 2.5 + 0.5), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(decode(images[i]).image)
        p = probabilities[i]
        ax.set_title(f"is {LABELS[y_true[i]]}\nanswered {LABELS[p.argmax()]} ({p.max():.0%})", fontsize=8)
    if not len(shown):
        axes[0, 0].text(0.5, 0.5, "no misclassified test image", fontsize=12, ha="center", va="center")
    more = f", the first {len(shown)} shown" if len(wrong) > len(shown) else ""
    fig.suptitle(f"misclassified test images: {len(wrong)} of {len(y_true)}{more}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(wrong)


def plot_learning_curve(points: Sequence, path: Path) -> None:
    """``report/learning_curve.png``: cross-validated accuracy against the training photos per fold."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    photos = [p.photos for p in points]
    accuracy = np.array([p.accuracy for p in points]) * 100
    sd = np.array([p.sd for p in points]) * 100
    ax.errorbar(photos, accuracy, yerr=sd, marker="o", capsize=3, color="#2b6cb0")
    ax.fill_between(photos, accuracy - sd, accuracy + sd, alpha=0.15, color="#2b6cb0")
    ax.set_xscale("log")
    ax.set_xticks(photos, [f"{n:,}" for n in photos])
    ax.minorticks_off()
    ax.set_xlabel("training photos per fold (all kinds)")
    ax.set_ylabel("accuracy on held-out photos (%)")
    low = max(0.0, float((accuracy - sd).min()) - 2)
    ax.set_ylim(low, min(100.0, float((accuracy + sd).max()) + 1))
    ax.set_title("learning curve (cross-validated, mean ± sd over folds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
