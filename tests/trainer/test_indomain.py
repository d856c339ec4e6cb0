"""The in-domain score: its distance, its threshold's calibration, its cross-validated evaluation, and the
out-of-domain set it is judged on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.trainer import indomain, oodset


def clusters(rng: np.random.Generator, n: int, centre: np.ndarray, spread: float = 0.3) -> np.ndarray:
    """``(n, 2 views, d)`` features around ``centre``: a photo and a slightly different mirror image."""
    photos = centre + spread * rng.normal(size=(n, len(centre)))
    mirrors = photos + 0.05 * rng.normal(size=photos.shape)
    return np.stack([photos, mirrors], axis=1).astype(np.float32)


def test_distance_is_the_cosine_distance_to_the_kth_nearest_view() -> None:
    rng = np.random.default_rng(0)
    bank_views, queries = rng.normal(size=(30, 2, 8)), rng.normal(size=(5, 8))
    bank = indomain.bank_of(bank_views)
    got = indomain.distances(bank, queries, k=7)
    flat = bank_views.reshape(-1, 8)
    for query, distance in zip(queries, got, strict=True):
        cosines = flat @ query / (np.linalg.norm(flat, axis=1) * np.linalg.norm(query))
        assert distance == pytest.approx(1 - np.sort(cosines)[-7], abs=1e-5)
    # The length of a feature vector does not matter, only its direction.
    np.testing.assert_allclose(indomain.distances(bank, 3 * queries, k=7), got, atol=1e-6)


def test_the_threshold_flags_about_the_chosen_share_of_new_in_domain_photos() -> None:
    """Calibrated on held-out distances, then judged on many new photos of the same distribution."""
    rng = np.random.default_rng(1)
    centre = rng.normal(size=64)
    model = indomain.fit(clusters(rng, 300, centre), clusters(rng, 60, centre), k=20)
    assert model.calibration_photos == 360
    new = clusters(rng, 4000, centre)[:, 0]
    flagged = float(np.mean(model.distances(new) > model.threshold))
    # 2.5 % by design; a bank of all 300 photos is a little closer than the 240-photo banks of calibration.
    assert 0.005 <= flagged <= indomain.FLAG_RATE + 0.01, flagged
    elsewhere = clusters(rng, 200, rng.normal(size=64))[:, 0]
    assert np.mean(model.distances(elsewhere) > model.threshold) == 1.0
    meta = model.metadata()
    assert meta["k"] == 20 and meta["threshold"] == pytest.approx(model.threshold) and meta["bank_views"] == 600


def test_evaluation_cross_validates_flagged_and_caught() -> None:
    rng = np.random.default_rng(2)
    centre = rng.normal(size=32)
    views = np.concatenate([clusters(rng, 80, centre), clusters(rng, 80, centre + 0.2)])
    y = np.repeat([0, 1], 80)
    far = clusters(rng, 30, rng.normal(size=32))[:, 0]
    near = clusters(rng, 3, centre)[:, 0]  # "out-of-domain" images that are really in domain: missed
    result = indomain.evaluate(views, y, np.concatenate([far, near]), [f"far{i}" for i in range(30)] + ["a", "b", "c"])
    assert result.photos == 160 and result.ood_images == 33 and result.folds == 5
    assert result.flagged <= 0.06
    assert result.caught == pytest.approx(30 / 33, abs=0.04)
    assert set(result.missed) == {"a", "b", "c"}
    assert 0.85 < result.auroc < 1.0
    assert set(result.metrics()) == {"domain_cv_flagged", "domain_ood_caught", "domain_ood_auroc", "domain_ood_images"}
    assert "real photos flagged (5-fold CV)" in result.summary()


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
