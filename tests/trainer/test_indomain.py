"""The in-domain verdict: the distance to a bounded bank, its thresholds, P(neither), their cross-validated
figures (and calibration's) on synthetic data with two sources and refused kinds; and the out-of-domain set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.trainer import calibration, crosssource, crossval, estimates, indomain, oodset
from tests.trainer.synthetic import TWO_SOURCES, synthetic


def test_distance_is_the_cosine_distance_to_the_kth_nearest_view() -> None:
    rng = np.random.default_rng(0)
    views, queries = rng.normal(size=(2, 30, 8)), rng.normal(size=(5, 8))
    bank = indomain.bank_of(views, np.array(["a"] * 30))
    assert bank.represented == 60 and len(bank.rows) == 60 and bank.entries_for(7) == 7
    got = bank.distances(queries, k=7)
    flat = views.reshape(-1, 8)
    for query, distance in zip(queries, got, strict=True):
        cosines = flat @ query / (np.linalg.norm(flat, axis=1) * np.linalg.norm(query))
        assert distance == pytest.approx(1 - np.sort(cosines)[-7], abs=1e-5)
    # The length of a feature vector does not matter, only its direction.
    np.testing.assert_allclose(bank.distances(3 * queries, k=7), got, atol=1e-6)


def test_the_bank_is_bounded_and_stratified_whatever_the_data() -> None:
    """The served model carries at most `cap` views: a sample drawn from each group in proportion, each standing
    for the views it was drawn from, so k still counts views of the whole training set."""
    rng = np.random.default_rng(1)
    groups = np.array(["a"] * 300 + ["b"] * 100)
    views = rng.normal(size=(2, 400, 16))
    bank = indomain.bank_of(views, groups, cap=64, seed=0)
    assert len(bank.rows) == 64 and bank.represented == 800
    assert bank.entries_for(20) == 2  # 20 of 800 views: 1.6 bank entries, rounded up
    again = indomain.bank_of(views, groups, cap=64, seed=0)
    np.testing.assert_array_equal(again.rows, bank.rows)
    bigger = indomain.bank_of(rng.normal(size=(2, 4000, 16)), np.array(["a"] * 4000), cap=64, seed=0)
    assert len(bigger.rows) == 64, "ten times the photos, the same bank size"
    per_group = {g: 0 for g in "ab"}
    flat_groups = np.tile(groups, 2)
    for row in bank.rows:  # each bank row is one of the views, of its group
        match = np.flatnonzero(np.isclose(indomain.normalised(views.reshape(-1, 16)) @ row, 1.0, atol=1e-5))
        per_group[flat_groups[match[0]]] += 1
    assert per_group == {"a": 48, "b": 16}


def test_group_quantile_flags_at_most_the_rate_in_every_group() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.random(1000), rng.random(300) + 0.5])
    groups = np.array(["tight"] * 1000 + ["wide"] * 300)
    threshold = indomain.group_quantile(values, groups, 0.02)
    for g in ("tight", "wide"):
        assert np.mean(values[groups == g] > threshold) <= 0.02 + 1e-9


def test_a_small_group_does_not_set_the_bar_with_its_one_odd_photo() -> None:
    """40 photos of a second source, one of them far out: judged alone, its 98th percentile would be that photo
    and nothing of the refused kinds would be flagged; judged with everything, the bar stays where the bulk is."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.random(600) * 0.2, rng.random(39) * 0.2, [0.95]])
    groups = np.array(["big"] * 600 + ["small"] * 40)
    threshold = indomain.group_quantile(values, groups, 0.02)
    assert threshold < 0.25 and np.mean(values > threshold) <= 0.02 + 1 / len(values)  # a quantile: give or take one
    assert np.mean(values[groups == "big"] > threshold) <= 0.02 + 1e-9
    alone = indomain.group_quantile(values, groups, 0.02, min_group=1)  # every group judged alone: the old rule
    assert alone > threshold + 0.1


def test_the_distance_threshold_flags_about_the_chosen_share_of_new_photos() -> None:
    data = synthetic({("dandelion", "dandelion", "a"): 300, ("grass", "grass", "a"): 300}, seed=3, separation=0.0)
    train = np.flatnonzero(data.split == "train")
    val = np.flatnonzero(data.split == "val")
    model = indomain.fit(data.views[:, train], data.group[train], data.views[0, val], None, k=20, cap=128)
    assert model.neither_threshold is None and model.distance_rate == indomain.FLAG_RATE
    new = synthetic({("dandelion", "dandelion", "a"): 2000}, seed=3, separation=0.0)
    flagged = float(np.mean(model.distances(new.views[0]) > model.threshold))
    assert 0.005 <= flagged <= indomain.FLAG_RATE + 0.02, flagged
    far = synthetic({("dandelion", "elsewhere", "a"): 100}, seed=99, separation=0.0).views[0] * -1.0
    assert np.mean(model.distances(far) > model.threshold) == 1.0
    meta = model.metadata()
    assert meta["k"] == 20 and meta["bank_views"] == 128 and meta["threshold"] == pytest.approx(model.threshold)


def figures(data, c=0.1, seed=0):
    ood = -np.abs(synthetic({("dandelion", "far", "x"): 30}, seed=50).views[0].astype(np.float32))
    plan = crossval.plan(len(data), 5, 1)
    oof = crossval.out_of_fold(data, ood, plan, (c,), c, seed, k=10, cap=64)
    held = estimates.neither_held_out(data, oof)
    threshold = indomain.group_quantile(held[0], held[1], indomain.NEITHER_RATE) if held else None
    return oof, estimates.estimate(data, oof, plan, threshold, [f"far{i}" for i in range(30)]), threshold


def test_cross_validated_figures_on_two_sources_and_refused_kinds() -> None:
    data = synthetic(TWO_SOURCES, seed=4)
    oof, est, threshold = figures(data)
    assert threshold is not None and len(oof.index) == len(data)
    assert est.mean > 0.9 and set(est.recall) == {"dandelion", "grass"}
    assert set(est.by_group) == {"dandelion/lawns", "dandelion/flowers", "grass/lawns"}
    assert est.flagged <= 0.12, "about 2 % by distance and 2 % by P(neither) in each group, and more at worst"
    assert set(est.caught_by_kind) == {"daisy", "rose"} and min(est.caught_by_kind.values()) > 0.9
    assert est.ood_caught > 0.9 and est.ood_images == 30
    metrics = est.metrics()
    for name in ("cv_accuracy_mean", "domain_cv_flagged", "domain_caught_daisy", "calibration_ece_after",
                 "low_confidence_share", "cv_accuracy_dandelion_flowers", "domain_ood_caught"):  # fmt: skip
        assert np.isfinite(metrics[name]), name


def test_without_refused_photos_there_is_no_p_neither_and_the_old_rate() -> None:
    data = synthetic({("dandelion", "dandelion", "a"): 80, ("grass", "grass", "a"): 80}, seed=5)
    _, est, threshold = figures(data)
    assert threshold is None and est.caught_by_kind == {}
    assert "domain_neither_caught" not in est.metrics()


def test_temperature_scaling_recovers_an_overconfident_model() -> None:
    """Logits three times too large: calibration finds a temperature near 3 and the error falls."""
    rng = np.random.default_rng(6)
    truth = rng.normal(size=4000) * 2.0
    y = (rng.random(4000) < 1 / (1 + np.exp(-truth))).astype(int)
    logits = np.stack([np.zeros(4000), 3.0 * truth], axis=1)
    fitted = calibration.fit(logits, y)
    assert fitted.method == "temperature" and fitted.temperature == pytest.approx(3.0, rel=0.1)
    before = calibration.expected_calibration_error(calibration.two_class(logits), y)
    after = calibration.expected_calibration_error(fitted.apply(logits), y)
    assert after < 0.02 < before
    assert fitted.log_loss["temperature"] < fitted.log_loss["none"]


def test_platt_scaling_wins_only_when_a_shift_is_needed() -> None:
    rng = np.random.default_rng(7)
    truth = rng.normal(size=4000) * 2.0
    y = (rng.random(4000) < 1 / (1 + np.exp(-truth))).astype(int)
    shifted = np.stack([np.zeros(4000), truth + 1.5], axis=1)  # a biased model: temperature cannot fix it
    assert calibration.fit(shifted, y).method == "platt"
    fine = np.stack([np.zeros(4000), truth], axis=1)
    assert calibration.fit(fine, y).method == "temperature"


def test_the_low_confidence_point_is_where_answers_stop_being_right_nine_times_in_ten() -> None:
    rng = np.random.default_rng(8)
    confidence = rng.uniform(0.5, 1.0, 20_000)
    right = rng.random(20_000) < confidence  # perfectly calibrated
    y = np.where(right, 1, 0)
    probabilities = np.stack([1 - confidence, confidence], axis=1)
    threshold = calibration.low_confidence_threshold(probabilities, y)
    assert threshold == pytest.approx(0.9, abs=0.02)
    assert np.mean(right[confidence < threshold]) < 0.9 < np.mean(right[confidence >= threshold])


def test_cross_source_estimates_hold_a_source_or_a_kind_out() -> None:
    data = synthetic(TWO_SOURCES, seed=9)
    result = crosssource.estimate(data, np.arange(len(data)), 0.1, 0.8)
    assert [c.what for c in result.sources] == ["dandelion/flowers", "dandelion/lawns"]
    assert [c.what for c in result.kinds] == ["neither/daisy", "neither/rose"]
    assert result.not_estimable == ["grass: one source only (lawns)"]
    assert all(0 <= c.right <= 1 and c.photos > 0 for c in result.sources + result.kinds)
    assert {"xs_dandelion_flowers_recall", "xk_daisy_caught"} <= set(result.metrics())
    assert "never seen" in result.summary()


def test_the_out_of_domain_set_is_built_reproducibly_and_reused(tmp_path) -> None:
    first = oodset.ensure(tmp_path / "ood")
    names, blobs, sources = first
    assert len(names) == len(set(names)) >= 150
    kinds = {source.split(" ")[0].rstrip(":") for source in sources}
    assert {"scikit-image", "scikit-learn", "matplotlib", "generated"} <= kinds
    assert not any("grass" in name for name in names), "scikit-image's grass photo is in domain"
    stamp = (tmp_path / "ood" / names[0]).stat().st_mtime_ns
    again = oodset.ensure(tmp_path / "ood")  # reused, not rebuilt
    assert again[0] == names and (tmp_path / "ood" / names[0]).stat().st_mtime_ns == stamp
    rebuilt = oodset.build(tmp_path / "other")
    assert [e["file"] for e in rebuilt] == names
    assert [(tmp_path / "other" / n).read_bytes() for n in names[:40]] == blobs[:40]  # same seed, same images
    manifest = json.loads((tmp_path / "ood" / "manifest.json").read_text())
    assert manifest["version"] == oodset.VERSION


# The arithmetic of the verdict, pinned value by value (mutmut on services/trainer/indomain.py).


def kth_distance(bank_rows: np.ndarray, queries: np.ndarray, entries: int) -> np.ndarray:
    """By hand: 1 - the ``entries``-th largest cosine of each query to the (unit) bank rows."""
    unit = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    return 1.0 - np.sort(unit @ bank_rows.T, axis=1)[:, -entries]


def test_normalised_is_unit_length_along_the_last_axis_in_float32() -> None:
    np.testing.assert_allclose(indomain.normalised(np.array([0.3, 0.4])), [0.6, 0.8], rtol=1e-6)
    assert indomain.normalised(np.array([[0.3, 0.4]], np.float64)).dtype == np.float32
    assert indomain.normalised(np.zeros((2, 3))).tolist() == [[0.0] * 3] * 2  # no division by zero


def test_bank_entries_for_k_views() -> None:
    bank = indomain.Bank(np.eye(10, dtype=np.float32), represented=100)
    assert [bank.entries_for(k) for k in (1, 10, 11, 20, 1000)] == [1, 1, 2, 2, 10]  # ceil(k / 10), within 1..10
    assert indomain.Bank(np.eye(4, dtype=np.float32), represented=1).entries_for(1) == 4
    assert indomain.Bank(np.eye(4, dtype=np.float32), represented=0).entries_for(1) == 4


def test_distances_in_chunks_are_the_kth_nearest_for_every_row() -> None:
    """More queries than two chunks of 4096: every row is computed, against the k-th nearest, in float32."""
    rng = np.random.default_rng(7)
    bank = indomain.bank_of(rng.normal(size=(1, 1000, 6)), np.array(["a"] * 1000), cap=1000)  # long rows: the
    queries = rng.normal(size=(9000, 6))  # partition leaves their tail unsorted, so only the k-th is the k-th
    got = bank.distances(queries, k=3)
    assert got.dtype == np.float32 and got.shape == (9000,)
    np.testing.assert_allclose(got, kth_distance(bank.rows, queries, 3), atol=1e-5)
    model = indomain.DomainModel(bank, 3, 0.5, None, 0.025, None, 10)
    np.testing.assert_array_equal(model.distances(queries[:10]), got[:10])  # its own k, not the default


def test_the_bank_samples_without_replacement_and_keeps_small_groups() -> None:
    rng = np.random.default_rng(8)
    views = rng.normal(size=(1, 1000, 6))
    groups = np.array(["a"] * 996 + ["b"] * 4)
    bank = indomain.bank_of(views, groups, cap=100, seed=0)
    # a: round(100 * 996 / 1000) = 100; b: round(0.4) = 0, but every group keeps at least one
    assert len(bank.rows) == 101 and len(np.unique(bank.rows, axis=0)) == 101
    np.testing.assert_array_equal(bank.rows, indomain.bank_of(views, groups, cap=100).rows)  # the default seed is 0
    assert not np.array_equal(bank.rows, indomain.bank_of(views, groups, cap=100, seed=1).rows)
    whole = indomain.bank_of(views[:, :100], groups[:100], cap=100)
    np.testing.assert_array_equal(whole.rows, indomain.normalised(views[0, :100]))  # at the cap: every view, in order


def test_held_out_distances_are_each_photo_s_first_view_against_the_other_folds() -> None:
    rng = np.random.default_rng(9)
    views = rng.normal(size=(2, 40, 6))
    groups = np.array(["a"] * 40)
    got = indomain.held_out_distances(views, groups, k=2, cap=512, folds=4, seed=5)
    assert got.dtype == np.float32
    expected = np.empty(40)
    for fold in np.array_split(np.random.default_rng(5).permutation(40), 4):
        rest = np.setdiff1d(np.arange(40), fold)
        rows = indomain.normalised(views[:, rest].reshape(-1, 6))
        expected[fold] = kth_distance(rows, views[0, fold], 2)  # 60 views: k=2 is 2 entries
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(
        indomain.held_out_distances(views, groups, k=2, folds=4),
        indomain.held_out_distances(views, groups, 2, folds=4, seed=0),
    )
    # A bank over its cap is sampled with the same seed as the folds.
    sampled = indomain.held_out_distances(views, groups, k=2, cap=20, folds=4, seed=5)
    for fold in np.array_split(np.random.default_rng(5).permutation(40), 4):
        rest = np.setdiff1d(np.arange(40), fold)
        bank = indomain.bank_of(views[:, rest], groups[rest], 20, 5)
        np.testing.assert_array_equal(sampled[fold], bank.distances(views[0, fold], 2))


def test_group_quantile_exactly() -> None:
    values = np.concatenate([np.arange(100) / 100, np.arange(100) / 100 + 1.0])
    groups = np.array(["low"] * 100 + ["high"] * 100)
    everything = float(np.quantile(values, 0.9))
    high = float(np.quantile(values[100:], 0.9))
    assert indomain.group_quantile(values, groups, 0.1) == high > everything  # min_group ceil(2 / 0.1) = 20
    # A group of exactly min_group is judged alone; one fewer is not.
    assert indomain.group_quantile(values, groups, 0.1, min_group=100) == high
    assert indomain.group_quantile(values, groups, 0.1, min_group=101) == everything
    # The default min_group is ceil(2 / rate): 20 for 10 %, so a group of 20 is judged alone, one of 19 not.
    small = np.concatenate([np.zeros(1000), np.arange(20) / 20 + 5])
    # Each group is judged by its own values (with three groups, not by the others').
    three = np.concatenate([np.arange(100) / 100, np.arange(100) / 100 + 1.0, np.arange(100) / 100 + 2.0])
    by = np.array(["a"] * 100 + ["b"] * 100 + ["c"] * 100)
    assert indomain.group_quantile(three, by, 0.1) == float(np.quantile(three[200:], 0.9))
    for size, alone in ((20, True), (19, False)):
        v, g = small[: 1000 + size], np.array(["big"] * 1000 + ["small"] * size)
        assert (indomain.group_quantile(v, g, 0.1) > 1) is alone, size


def test_rates() -> None:
    assert indomain.rates(True) == (indomain.DISTANCE_RATE, indomain.NEITHER_RATE) == (0.02, 0.02)
    assert indomain.rates(False) == (indomain.FLAG_RATE, None) == (0.025, None)


def test_fit_with_refused_kinds_sets_every_field_from_its_parts() -> None:
    rng = np.random.default_rng(10)
    train, groups = rng.normal(size=(2, 60, 6)), np.array(["a"] * 40 + ["b"] * 20)
    val = rng.normal(size=(15, 6))
    neither = (rng.random(300), np.array(["a"] * 200 + ["b"] * 100))
    model = indomain.fit(train, groups, val, neither, ("daisy", "rose"), k=3, cap=50, seed=4)
    bank = indomain.bank_of(train, groups, 50, 4)
    np.testing.assert_array_equal(model.bank.rows, bank.rows)
    held = np.concatenate([indomain.held_out_distances(train, groups, 3, 50, seed=4), bank.distances(val, 3)])
    assert model.threshold == float(np.quantile(held, 1 - 0.02))
    assert model.neither_threshold == indomain.group_quantile(neither[0], neither[1], 0.02)
    assert model.metadata() == {
        "method": "cosine distance to the k-th nearest training view (pooled backbone features), and the "
        "head's P(neither) where it learnt kinds of photos to refuse",
        "k": 3,
        "threshold": model.threshold,
        "flag_rate": 0.02,
        "neither_threshold": model.neither_threshold,
        "neither_flag_rate": 0.02,
        "refused_kinds": ["daisy", "rose"],
        "bank_views": 50,
        "bank_represents_views": 120,
        "bank_entries_for_k": 2,
        "calibration_photos": 75,
    }
    assert type(model.metadata()["neither_threshold"]) is float
    assert indomain.fit(train, groups, val, None, k=3, cap=50, seed=4).metadata()["neither_threshold"] is None
    # Flagged when either score says so, strictly above its threshold.
    flags = model.flagged(np.array([0.0, 9.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    assert flags.tolist() == [False, True, True]
    at = model.flagged(np.array([model.threshold]), np.array([model.neither_threshold]))
    assert at.tolist() == [False]
    without = indomain.fit(train, groups, val, None, k=3, cap=50)
    assert without.flagged(np.array([0.0]), np.array([1.0])).tolist() == [False]  # no P(neither) threshold
    np.testing.assert_array_equal(without.bank.rows, indomain.bank_of(train, groups, 50, 0).rows)  # seed 0
