"""The drift reference's arithmetic, value by value: bins, shares, PSI, its round trip, and what it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.descriptors import COLOR_COLUMNS, DESCRIPTOR_COLUMNS
from shared.drift import (
    ALERTING_FEATURES,
    BINS,
    FLOOR,
    PSI_THRESHOLD,
    FeatureReference,
    Reference,
    as_rows,
    worst,
)


def test_the_constants_are_the_documented_ones() -> None:
    assert (BINS, PSI_THRESHOLD, FLOOR) == (10, 0.25, 1e-3)
    assert ALERTING_FEATURES == COLOR_COLUMNS and "width" not in ALERTING_FEATURES


def test_a_value_on_an_edge_falls_in_the_bin_above_it() -> None:
    feature = FeatureReference(edges=(1.0, 2.0), expected=(0.25, 0.5, 0.25), mean=0.0, std=0.0)
    shares = feature.shares(np.array([0.5, 1.0, 1.5, 2.0, 3.0]))
    assert shares.tolist() == [0.2, 0.4, 0.4]
    assert feature.shares(np.array([])).tolist() == [0.0, 0.0, 0.0]  # no values: no shares, no division by zero


def test_psi_is_the_formula_with_the_floor_on_either_side() -> None:
    feature = FeatureReference(edges=(1.0,), expected=(0.5, 0.5), mean=0.0, std=0.0)
    assert feature.psi(np.array([0.0, 2.0])) == 0.0  # the same shares
    by_hand = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert feature.psi(np.array([0.0, 0.0, 0.0, 2.0])) == pytest.approx(by_hand, rel=1e-12)
    # An empty bin scores with the floor's share, high but finite, on the live side...
    assert feature.psi(np.array([0.0])) == pytest.approx(
        (1 - 0.5) * math.log(1 / 0.5) + (FLOOR - 0.5) * math.log(FLOOR / 0.5), rel=1e-12
    )
    # ...and on the reference's side.
    empty = FeatureReference(edges=(1.0,), expected=(1.0, 0.0), mean=0.0, std=0.0)
    assert empty.psi(np.array([2.0])) == pytest.approx(
        (FLOOR - 1) * math.log(FLOOR / 1) + (1 - FLOOR) * math.log(1 / FLOOR), rel=1e-12
    )
    assert type(feature.psi(np.array([0.0]))) is float


def columns(values: list[float]) -> dict[str, list[float]]:
    return {name: values for name in DESCRIPTOR_COLUMNS}


def test_build_bins_by_deciles_and_keeps_mean_and_std() -> None:
    values = [float(v) for v in range(1, 21)]  # 20 values: two per decile
    reference = Reference.build(columns(values), "images:v3 train split")
    assert reference.samples == 20 and reference.source == "images:v3 train split"
    assert set(reference.features) == set(DESCRIPTOR_COLUMNS)
    feature = reference.features["rgb_r_mean"]
    assert feature.edges == pytest.approx(tuple(np.quantile(values, np.arange(1, 10) / 10)))
    assert len(feature.edges) == 9 and feature.edges[0] == pytest.approx(2.9)
    assert feature.expected == pytest.approx((0.1,) * 10)  # 2.9 < 3: each bin holds two values
    assert feature.mean == 10.5 and feature.std == pytest.approx(np.std(values))
    assert all(type(e) is float for e in (*feature.edges, *feature.expected, feature.mean, feature.std))
    assert reference.psi(as_rows([dict.fromkeys(DESCRIPTOR_COLUMNS, v) for v in values])) == pytest.approx(
        dict.fromkeys(DESCRIPTOR_COLUMNS, 0.0), abs=1e-12
    )


def test_build_with_other_bins_and_repeated_values() -> None:
    quartiles = Reference.build(columns([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]), bins=4).features["width"]
    assert quartiles.edges == pytest.approx((2.75, 4.5, 6.25)) and quartiles.expected == pytest.approx((0.25,) * 4)
    # Equal quantiles collapse into one edge; the shares still add up to one.
    flat = Reference.build(columns([1.0] * 9 + [2.0])).features["height"]
    assert flat.edges == pytest.approx((1.0, 1.1)) and flat.expected == pytest.approx((0.0, 0.9, 0.1))
    assert Reference.build(columns([5.0])).features["width"].edges == (5.0,)
    assert Reference.build(columns([5.0])).source == ""


def test_build_refuses_an_empty_column() -> None:
    with pytest.raises(ValueError, match=r"^a drift reference needs at least one value per feature$"):
        Reference.build(columns([]))


def test_psi_per_feature_reads_each_column_in_order() -> None:
    reference = Reference.build(
        {name: [float(i)] * 4 + [float(i) + 1] * 4 for i, name in enumerate(DESCRIPTOR_COLUMNS)}
    )
    # Every row in the lower bin of its own column only: each feature shifts alike, whatever its position.
    rows = np.array([[float(i) for i in range(len(DESCRIPTOR_COLUMNS))]] * 2)
    scores = reference.psi(rows)
    assert list(scores) == list(DESCRIPTOR_COLUMNS)
    assert set(np.round(list(scores.values()), 12)) == {round(reference.features["width"].psi(np.array([0.0])), 12)}
    assert scores["width"] > PSI_THRESHOLD


def test_round_trip_through_a_dict() -> None:
    reference = Reference.build(columns([float(v) for v in range(30)]), "s train split")
    data = reference.to_dict()
    assert data["bins"] == "deciles" and data["samples"] == 30 and data["source"] == "s train split"
    assert data["features"]["width"] == {
        "edges": list(reference.features["width"].edges),
        "expected": list(reference.features["width"].expected),
        "mean": 14.5,
        "std": reference.features["width"].std,
    }
    assert Reference.from_dict(data) == reference
    del data["source"]
    assert Reference.from_dict(data).source == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("features"), "malformed drift reference: KeyError"),
        (lambda d: d.pop("samples"), "malformed drift reference: KeyError"),
        (lambda d: d.update(samples="many"), "malformed drift reference: ValueError"),
        (lambda d: d.update(features=[]), "malformed drift reference: AttributeError"),
        (lambda d: d["features"]["width"].update(edges=None), "malformed drift reference: TypeError"),
        (lambda d: d["features"]["width"].pop("mean"), "malformed drift reference: KeyError"),
        (lambda d: d["features"]["width"].update(std="wide"), "malformed drift reference: ValueError"),
        (lambda d: d["features"].pop("hsv_v_std"), r"drift reference lacks \['hsv_v_std'\]"),
        (lambda d: d["features"]["height"]["expected"].pop(), "drift reference for height: 9 edges but 9 shares"),
    ],
)
def test_from_dict_refuses_what_is_malformed(change, message: str) -> None:
    data = Reference.build(columns([float(v) for v in range(30)])).to_dict()
    change(data)
    with pytest.raises(ValueError, match=message) as caught:
        Reference.from_dict(data)
    if message.startswith("malformed"):  # the cause is in the message; the traceback does not repeat it
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_as_rows_orders_columns_and_keeps_an_empty_window_two_dimensional() -> None:
    descriptors = [
        {name: i * 100 + j for j, name in enumerate(reversed(DESCRIPTOR_COLUMNS))} for i in range(2)
    ]  # ints too
    rows = as_rows(descriptors)
    assert rows.dtype == np.float64 and rows.shape == (2, len(DESCRIPTOR_COLUMNS))
    assert rows[1].tolist() == [descriptors[1][name] for name in DESCRIPTOR_COLUMNS]
    assert as_rows([]).shape == (0, len(DESCRIPTOR_COLUMNS))


def test_worst_is_the_alerting_feature_that_moved_most() -> None:
    scores = dict.fromkeys(DESCRIPTOR_COLUMNS, 0.01) | {"width": 9.0, "hsv_s_std": 0.3, "rgb_g_mean": 0.2}
    assert worst(scores) == ("hsv_s_std", 0.3)  # width moved more, but does not alert
    assert worst(scores, ("width", "rgb_g_mean")) == ("width", 9.0)
