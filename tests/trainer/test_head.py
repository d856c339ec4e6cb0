"""The linear head and the cross-validation that estimates the recipe: folding into one Dense layer, the choice of
regularisation, and folds that never split a photo from its mirror image."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from services.trainer import crossval, head


def separable(n: int = 60, features: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two views per photo (the second a slightly moved copy), classes apart along the first feature."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    base = rng.normal(size=(n, features))
    base[:, 0] += np.where(y == 1, 2.5, -2.5)
    views = np.stack([base, base + rng.normal(scale=0.1, size=base.shape)], axis=1)
    return views * 7.0 + 3.0, y  # far from standardised: the head must standardise


def test_the_dense_layer_equals_the_fitted_head() -> None:
    views, y = separable()
    fitted = head.fit(views, y, c=0.1)
    layer = keras.layers.Dense(2, activation="softmax")
    layer.build((None, views.shape[-1]))
    layer.set_weights(list(fitted.dense_weights()))
    x = views[:, 0].astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), fitted.probabilities(x), atol=1e-5)
    assert (fitted.probabilities(x).argmax(axis=1) == y).mean() > 0.95
    # Label order: column 1 is LABELS[1] ("grass"), the class with the larger first feature here.
    assert (
        fitted.probabilities(views[y == 1, 0])[:, 1].mean()
        > 0.75
        > fitted.probabilities(views[y == 0, 0])[:, 1].mean() + 0.5
    )


def test_choose_c_prefers_stronger_regularisation_on_a_tie() -> None:
    views, y = separable()
    c, curve = head.choose_c(views, y, grid=(0.3, 0.01, 0.1), folds=5)
    assert set(curve) == {0.3, 0.01, 0.1}
    best = max(curve.values())
    assert curve[c] == best and c == min(k for k, v in curve.items() if v == best)


def test_cross_validation_never_judges_a_photo_by_its_own_mirror_image() -> None:
    """Pure noise, each photo's two views identical: a fold that split them would score far above chance."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 40)
    noise = rng.normal(size=(80, 200))
    views = np.stack([noise, noise], axis=1)
    result = crossval.cross_validate(views, y, folds=5, grid=(1.0,))
    assert result.mean < 0.75, result.fold_accuracies


def test_cross_validation_reports_folds_classes_and_choices() -> None:
    views, y = separable(n=50)
    result = crossval.cross_validate(views, y, folds=5, grid=(0.01, 0.1))
    assert len(result.fold_accuracies) == 5 and result.photos == 50
    assert set(result.recall) == {"dandelion", "grass"}
    assert all(c in (0.01, 0.1) for c in result.chosen_c)
    assert result.mean > 0.9
    metrics = result.metrics()
    assert metrics["cv_accuracy_mean"] == pytest.approx(np.mean(result.fold_accuracies))
    assert metrics["cv_accuracy_sd"] == pytest.approx(np.std(result.fold_accuracies, ddof=1))
    assert "5-fold cross-validation on 50 photos" in result.summary()


def test_a_class_with_fewer_photos_than_folds_still_cross_validates() -> None:
    views, y = separable(n=60)
    keep = np.r_[np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)]
    result = crossval.cross_validate(views[keep], y[keep], folds=5, grid=(0.1,))
    assert result.folds == 3


def test_repeated_cross_validation_shuffles_the_folds() -> None:
    views, y = separable(n=40)
    once = crossval.cross_validate(views, y, folds=4, grid=(0.1,), seed=3)
    thrice = crossval.cross_validate(views, y, folds=4, grid=(0.1,), seed=3, repeats=3)
    assert len(thrice.fold_accuracies) == 12 and thrice.repeats == 3
    assert thrice.fold_accuracies[:4] == once.fold_accuracies  # the first shuffle is the single run's
    assert "x 3 shuffles" in thrice.summary()
