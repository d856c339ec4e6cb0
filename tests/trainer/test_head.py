"""The softmax head and the cross-validation that judges the recipe: the objective scikit-learn minimises, memory
by blocks, folding into one Dense layer, sample weights, folds that never split a photo from its mirror image, and
a cost that is planned."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from services.trainer import crossval, embeddings, head
from tests.trainer.synthetic import TWO_SOURCES, synthetic


def rows_and_targets(data):
    return crossval.rows_of(data, np.arange(len(data)))


def test_the_head_minimises_what_scikit_learn_minimises() -> None:
    """Same objective (C x weighted cross-entropy + half the squared weights, intercept free), same answers."""
    data = synthetic(TWO_SOURCES)
    rows, targets, weights = rows_and_targets(data)
    fitted = head.fit(rows, targets, data.classes, 0.05, weights)
    standardised = (rows.astype(np.float64) - fitted.mean) / fitted.scale
    reference = LogisticRegression(C=0.05, max_iter=10_000, tol=1e-10).fit(standardised, targets, sample_weight=weights)
    np.testing.assert_allclose(head.softmax(fitted.logits(rows)), reference.predict_proba(standardised), atol=2e-4)


def test_blocks_give_the_same_head_as_one_matrix(monkeypatch) -> None:
    """Large data is read in row blocks from the float16 matrix, never copied whole (the memory bound)."""
    data = synthetic(TWO_SOURCES, seed=1)
    rows, targets, weights = rows_and_targets(data)
    whole = head.fit(rows, targets, data.classes, 0.1, weights)
    monkeypatch.setattr(head, "BLOCK_ROWS", 16)
    monkeypatch.setattr(head, "WHOLE_BYTES", 0)
    blocked = head.fit(rows, targets, data.classes, 0.1, weights)
    np.testing.assert_allclose(blocked.logits(rows), whole.logits(rows), atol=1e-3)
    assert blocked.logits(rows[:5]).dtype == np.float32


def test_the_same_data_gives_the_same_head() -> None:
    data = synthetic(TWO_SOURCES, seed=2)
    rows, targets, weights = rows_and_targets(data)
    first = head.fit(rows, targets, data.classes, 0.03, weights)
    second = head.fit(rows, targets, data.classes, 0.03, weights)
    np.testing.assert_array_equal(first.coef, second.coef)


def test_the_dense_layer_equals_the_calibrated_head() -> None:
    """Standardisation and calibration (scale and shift) fold exactly into one softmax Dense layer; the two
    served columns are LABELS' order."""
    data = synthetic(TWO_SOURCES, seed=3)
    rows, targets, weights = rows_and_targets(data)
    fitted = head.fit(rows, targets, data.classes, 0.1, weights).calibrated(0.6, -0.4)
    layer = keras.layers.Dense(2, activation="softmax")
    layer.build((None, rows.shape[-1]))
    layer.set_weights(list(fitted.dense_weights()))
    x = data.views[0].astype(np.float32)
    served = fitted.probabilities(x)
    np.testing.assert_allclose(np.asarray(layer(x)), served, atol=1e-5)
    logits = fitted.logits(x)
    expected = head.softmax(np.stack([logits[:, 0] * 0.6, logits[:, 1] * 0.6 - 0.4], axis=1))
    np.testing.assert_allclose(served, expected, atol=1e-6)
    grass = data.y == 1
    assert served[grass, 1].mean() > 0.8 and served[data.y == 0, 0].mean() > 0.8


def test_p_neither_is_the_refused_kinds_share() -> None:
    logits = np.array([[2.0, 0.0, 1.0, 1.0], [5.0, 0.0, -3.0, -3.0]])
    everything = head.softmax(logits)
    np.testing.assert_allclose(head.neither_probability(logits), everything[:, 2:].sum(axis=1))
    assert head.neither_probability(logits[:, :2]).tolist() == [0.0, 0.0]  # no refused kind learnt


def test_the_head_survives_a_round_trip_through_its_arrays() -> None:
    data = synthetic(TWO_SOURCES, seed=4)
    rows, targets, weights = rows_and_targets(data)
    fitted = head.fit(rows, targets, data.classes, 0.1, weights).calibrated(0.8, 0.1)
    again = head.SoftmaxHead.from_arrays(fitted.to_arrays())
    assert again.classes == fitted.classes
    np.testing.assert_array_equal(again.probabilities(rows[:10]), fitted.probabilities(rows[:10]))


def test_weights_even_out_classes_and_sources() -> None:
    """160 grass photos weigh as much as 668 dandelions; within dandelions each source weighs the same; the
    refused photos together as much as the two classes."""
    data = synthetic(TWO_SOURCES)
    index = np.arange(len(data))
    weights = data.weights(index)
    assert weights.mean() == pytest.approx(1.0)
    total = {g: weights[data.group == g].sum() for g in np.unique(data.group)}
    assert total["dandelion/lawns"] == pytest.approx(total["dandelion/flowers"])
    assert total["grass/lawns"] == pytest.approx(total["dandelion/lawns"] + total["dandelion/flowers"])
    refused = total["neither/daisy"] + total["neither/rose"]
    assert refused == pytest.approx(total["grass/lawns"] * 2)


def test_folds_spread_every_class_even_a_rare_one() -> None:
    y = np.array([0] * 50 + [1] * 50 + [2] * 3)
    folds = crossval.stratified_folds(y, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for fold in folds:
        assert abs(np.sum(y[fold] == 0) - 10) <= 1 and abs(np.sum(y[fold] == 1) - 10) <= 1
    assert sum(np.any(y[fold] == 2) for fold in folds) == 3  # 3 photos, 3 folds, never two in one


def test_choose_c_prefers_stronger_regularisation_on_a_tie() -> None:
    data = synthetic(TWO_SOURCES, separation=12.0)  # separable: every C is right on every photo
    c, curve = crossval.choose_c(data, np.arange(len(data)), (0.3, 0.01, 0.1), folds=3, seed=0)
    assert set(curve) == {0.3, 0.01, 0.1}
    best = max(curve.values())
    assert curve[c] == best and c == min(k for k, v in curve.items() if v == best)


def test_cross_validation_never_judges_a_photo_by_its_own_mirror_image() -> None:
    """Pure noise, each photo's two views identical: a fold that split them would score far above chance."""
    data = synthetic({("dandelion", "dandelion", "a"): 60, ("grass", "grass", "a"): 60}, separation=0.0)
    identical = np.stack([data.views[0], data.views[0]])
    noise = type(data)(**{**data.__dict__, "views": identical})
    plan = crossval.plan(len(noise), 5, 1)
    oof = crossval.out_of_fold(noise, noise.views[0, :5].astype(np.float32), plan, (1.0,), 1.0, seed=0)
    assert np.mean(oof.fold_accuracies) < 0.7, oof.fold_accuracies


def test_the_plan_nests_and_repeats_only_while_it_is_cheap(monkeypatch) -> None:
    small = crossval.plan(320, 5, 3)
    assert (small.nested, small.repeats, small.photos) == (True, 3, 320)
    assert "C chosen again inside each fold" in small.describe() and "3 shuffles" in small.describe()
    middle = crossval.plan(2860, 5, 3)
    assert (middle.nested, middle.repeats, middle.photos) == (False, 1, 2860)
    large = crossval.plan(100_000, 5, 3)
    assert large.photos == embeddings.EVALUATION_PHOTOS and "sample of 4000 of 100000" in large.describe()


def test_the_evaluation_sample_is_chosen_by_hash_and_stays_put_as_data_grows(monkeypatch) -> None:
    data = synthetic({("dandelion", "dandelion", "a"): 300, ("grass", "grass", "a"): 300})
    monkeypatch.setattr(embeddings, "EVALUATION_PHOTOS", 200)
    chosen = crossval.sample_index(data, 200)
    assert 150 < len(chosen) < 250
    fraction = embeddings.sample_fraction(len(data), 200)
    bigger = embeddings.sample_fraction(2 * len(data), 200)
    kept = [sha for sha in data.sha256 if embeddings.in_sample(sha, bigger)]
    assert all(embeddings.in_sample(sha, fraction) for sha in kept), "a smaller sample only drops photos"


def test_the_learning_curve_fits_on_growing_shares_and_judges_the_same_held_out_photos() -> None:
    """Hard, noisy classes: a head fitted on an eighth of the photos is worse than one fitted on all of them; the
    curve's sizes follow the shares, and its last point is the plain cross-validation of the same folds."""
    data = synthetic(TWO_SOURCES, separation=1.0, spread=4.0, seed=3)  # ~87 % at best
    index = np.arange(len(data))
    points = crossval.learning_curve(data, index, c=1.0, folds=4, seed=0, fractions=(0.125, 0.5, 1.0))
    sizes = [p.photos for p in points]
    assert sizes == sorted(sizes) and abs(sizes[-1] - len(data) * 3 / 4) <= 2 and abs(sizes[0] * 8 - sizes[-1]) <= 16
    assert points[0].accuracy < points[-1].accuracy - 0.03, points
    right = 0
    for test in crossval.stratified_folds(data.y, 4, 0):
        train = np.setdiff1d(index, test)
        fitted = crossval.fit_head(data, train, 1.0)
        served = test[data.served[test]]
        right += int(np.sum(fitted.logits(data.views[0, served])[:, :2].argmax(axis=1) == data.y[served]))
    folds_mean = points[-1].accuracy
    assert abs(folds_mean - right / np.count_nonzero(data.served)) < 0.02


def test_the_drift_reference_is_the_training_photos_of_the_two_classes() -> None:
    """The API compares live inputs with what the model serves: refused kinds (daisies, ...) are not in it."""
    from services.trainer.train import drift_reference
    from shared.descriptors import DESCRIPTOR_COLUMNS
    from shared.drift import Reference

    data = synthetic(TWO_SOURCES)
    refused = ~data.served
    for name in DESCRIPTOR_COLUMNS:  # make the refused photos' colours stand out
        data.descriptors[name][refused] = data.descriptors[name][refused] + 1000.0
    served = (data.split == "train") & data.served
    expected = Reference.build({n: data.descriptors[n][served] for n in DESCRIPTOR_COLUMNS}, "s train split")
    assert drift_reference(data, "s").to_dict() == expected.to_dict()
    everything = data.split == "train"
    assert (
        drift_reference(data, "s").to_dict()
        != Reference.build({n: data.descriptors[n][everything] for n in DESCRIPTOR_COLUMNS}, "s train split").to_dict()
    )
