"""Model output to label: the column order is the contract, and a wrong shape is refused."""

from __future__ import annotations

import numpy as np
import pytest

from shared.labels import LABELS, NEITHER, TRAINING_LABELS, UnknownLabelError, decode, label_index


def test_the_order_is_the_contract() -> None:
    assert LABELS == ("dandelion", "grass")
    assert TRAINING_LABELS == ("dandelion", "grass", "neither") and NEITHER == "neither"


def test_label_index() -> None:
    assert [label_index(label) for label in LABELS] == [0, 1]
    assert label_index("neither", TRAINING_LABELS) == 2
    with pytest.raises(UnknownLabelError, match=r"unknown label 'rose'; expected one of \['dandelion', 'grass'\]"):
        label_index("rose")
    with pytest.raises(UnknownLabelError):
        label_index("neither")  # a training label, never a served one
    assert issubclass(UnknownLabelError, ValueError)


def test_decode_takes_the_most_probable_column_and_keeps_every_class() -> None:
    rows = decode(np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], np.float32))
    assert [(label, round(confidence, 6)) for label, confidence, _ in rows] == [
        ("dandelion", 0.8), ("grass", 0.7), ("dandelion", 0.5),  # a tie: the first column
    ]  # fmt: skip
    assert rows[1][2] == pytest.approx({"dandelion": 0.3, "grass": 0.7})
    assert all(type(c) is float for _, c, per_class in rows for c in (c, *per_class.values()))


def test_decode_with_labels_of_a_model_of_its_own() -> None:
    rows = decode([[0.1, 0.2, 0.7]], TRAINING_LABELS)
    assert rows == [("neither", pytest.approx(0.7), pytest.approx({"dandelion": 0.1, "grass": 0.2, "neither": 0.7}))]


@pytest.mark.parametrize("shape", [(2,), (2, 3), (1, 2, 2), (0,)])
def test_decode_refuses_another_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected shape \(n, 2\), got"):
        decode(np.zeros(shape))


def test_decode_of_nothing_is_nothing() -> None:
    assert decode(np.zeros((0, 2))) == []
