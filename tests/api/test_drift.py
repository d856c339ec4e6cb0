"""Input drift gauges with a fake model whose reference is built from crafted photos."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from services.api.drift import DriftMonitor
from services.api.settings import ApiSettings
from shared.descriptors import DESCRIPTOR_COLUMNS, prepare
from shared.drift import PSI_THRESHOLD, Reference, as_rows, worst
from tests.api.fakes import FakeSource
from tests.api.test_prediction_log import metric, serving
from tests.crafted import crafted, crafted_jpeg


def darkened_jpeg(label: str, seed: int, factor: float = 0.45) -> bytes:
    buffer = io.BytesIO()
    ImageEnhance.Brightness(crafted(label, seed)).enhance(factor).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference() -> Reference:
    photos = [crafted_jpeg(label, seed) for label in ("dandelion", "grass") for seed in range(150)]
    descriptors = [prepare(photo).descriptors for photo in photos]
    return Reference.build({c: [d[c] for d in descriptors] for c in DESCRIPTOR_COLUMNS}, "crafted:v1 train split")


def psi_by_feature(text: str) -> dict[str, float]:
    return {c: v for c in DESCRIPTOR_COLUMNS if (v := metric(text, "model_input_drift_psi", feature=c)) is not None}


async def test_darkened_photos_move_the_gauge_and_normal_ones_do_not(reference: Reference, tmp_path) -> None:
    source = FakeSource()
    source.metadata = {"drift_reference": reference.to_dict()}
    settings = ApiSettings(prediction_log=False, drift_window=150, drift_min_samples=100)
    async with serving(settings, source) as (app, client):
        observed = app.state.classifier.drain  # inputs are described right after their answer
        for seed in range(150):  # new photos like the reference's: both classes, alternately
            label = ("grass", "dandelion")[seed % 2]
            await client.post("/predict", files={"file": ("p.jpg", crafted_jpeg(label, 5000 + seed))})
            if seed == 98:
                await observed()
                text = (await client.get("/metrics")).text
                assert metric(text, "model_drift_window_samples") == 99
                assert psi_by_feature(text) == {}  # too few inputs to say anything
        await observed()
        normal = psi_by_feature((await client.get("/metrics")).text)
        assert set(normal) == set(DESCRIPTOR_COLUMNS)
        assert worst(normal)[1] < PSI_THRESHOLD, normal
        for seed in range(150):  # the window turns over: only darkened photos in it
            await client.post("/predict", files={"file": ("d.jpg", darkened_jpeg("grass", 7000 + seed))})
        await observed()
        dark = psi_by_feature((await client.get("/metrics")).text)
    _, value = worst(dark)
    assert value > PSI_THRESHOLD, dark
    assert dark["hsv_v_mean"] > PSI_THRESHOLD and dark["rgb_g_mean"] > PSI_THRESHOLD  # darker, in the right places
    assert dark["width"] < 0.1 and dark["height"] < 0.1  # same sizes


def flat_png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, "PNG")
    return buffer.getvalue()


UNSURE = flat_png((140, 140, 51))
"""The fake model's P(dandelion) is ~0.5 on this olive: confidence ~0.5."""
SURE = flat_png((102, 102, 102))
"""Grey: P(grass) ~0.985."""


async def test_a_model_without_reference_exports_no_drift_but_still_the_confidence_share(tmp_path) -> None:
    """A known mix, 3 unsure answers of 10, makes the gauge 0.3 (the share below the threshold, not above)."""
    settings = ApiSettings(prediction_log=False, drift_window=10, drift_min_samples=5, low_confidence_threshold=0.7)
    async with serving(settings, FakeSource()) as (app, client):
        confidences = []
        for photo in [UNSURE] * 3 + [SURE] * 7:
            confidences.append((await client.post("/predict", files={"file": ("x.png", photo)})).json()["confidence"])
        await app.state.classifier.drain()
        text = (await client.get("/metrics")).text
    assert [c < 0.7 for c in confidences] == [True] * 3 + [False] * 7, confidences
    assert max(confidences[:3]) < 0.55 and min(confidences[3:]) > 0.95
    assert psi_by_feature(text) == {}
    assert metric(text, "model_drift_window_samples") == 10
    assert metric(text, "model_low_confidence_share") == pytest.approx(0.3)


def test_monitor_window_is_a_ring_and_the_scores_equal_shared_drift(reference: Reference) -> None:
    monitor = DriftMonitor(window=50, min_samples=10, low_confidence=0.8)
    monitor.set_reference({"drift_reference": reference.to_dict()}, "m v1")
    descriptors = [prepare(darkened_jpeg("grass", s)).descriptors for s in range(70)]
    for i, d in enumerate(descriptors):
        monitor.observe(d, confidence=0.5 if i % 5 == 0 else 0.95)
    rows, confidence = monitor.snapshot()
    assert len(rows) == 50
    assert sorted(map(tuple, rows)) == sorted(map(tuple, as_rows(descriptors[20:])))  # the 50 newest
    assert monitor.scores() == pytest.approx(reference.psi(as_rows(descriptors[20:])))
    assert np.mean(confidence < 0.8) == pytest.approx(0.2)


def test_reference_round_trip_and_malformed_ones(reference: Reference) -> None:
    assert Reference.from_dict(reference.to_dict()) == reference
    for broken in ({}, {"features": {}, "samples": 3}, {"features": {"width": {"edges": [1]}}, "samples": 1}):
        with pytest.raises(ValueError):
            Reference.from_dict(broken)
    monitor = DriftMonitor()
    monitor.set_reference({"drift_reference": {"features": "nonsense"}}, "m v2")
    assert monitor.reference is None


def test_psi_is_near_zero_on_the_reference_itself_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(1)
    values = {c: rng.normal(0.5, 0.1, 2000) for c in DESCRIPTOR_COLUMNS}
    reference = Reference.build(values)
    same = reference.psi(np.column_stack([rng.normal(0.5, 0.1, 1000) for _ in DESCRIPTOR_COLUMNS]))
    shifted = reference.psi(np.column_stack([rng.normal(0.6, 0.1, 1000) for _ in DESCRIPTOR_COLUMNS]))
    assert max(same.values()) < 0.05
    assert min(shifted.values()) > PSI_THRESHOLD


class UnsureModel(FakeSource):
    """A version whose metadata sets its own "not sure" threshold (as the trainer's calibrated models do)."""

    def load(self, version: str, run_id: str):
        return dataclasses.replace(super().load(version, run_id), low_confidence_threshold=0.75)


async def test_the_share_counts_what_the_served_version_calls_not_sure(tmp_path) -> None:
    """The gauge and the answers agree: the version's threshold, not the setting (a fallback for versions
    without one), decides what counts as unsure."""
    settings = ApiSettings(prediction_log=False, drift_window=20, drift_min_samples=5, low_confidence_threshold=0.01)
    async with serving(settings, UnsureModel()) as (app, client):
        unsure, confidences = [], []
        for seed in range(20):
            label = ("grass", "dandelion")[seed % 2]
            answer = (await client.post("/predict", files={"file": ("p.jpg", crafted_jpeg(label, seed))})).json()
            unsure.append(answer["low_confidence"])
            confidences.append(answer["confidence"])
        await app.state.classifier.drain()
        share = metric((await client.get("/metrics")).text, "model_low_confidence_share")
    assert 0 < sum(unsure) < len(unsure), confidences  # a mix, so the share says something
    assert share == pytest.approx(sum(unsure) / len(unsure))
