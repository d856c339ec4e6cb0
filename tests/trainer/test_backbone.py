"""The EfficientNet-Lite port: its block tables against the weight files, an independent NumPy computation of
the stem and first block, and the ImageNet head's answers on real photos."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from services.trainer import backbone
from shared.images import preprocess

DAISY = 985
"""ImageNet class index of "daisy", the nearest of the 1000 classes to a dandelion flower."""


@pytest.fixture(scope="module")
def lite0() -> tuple[backbone.Variant, dict[str, np.ndarray]]:
    variant = backbone.VARIANTS["lite0"]
    return variant, backbone.load_weights(variant)


@pytest.mark.parametrize("name", sorted(backbone.VARIANTS))
def test_block_table_matches_the_weight_file(name: str) -> None:
    variant = backbone.VARIANTS[name]
    weights = backbone.load_weights(variant)
    table = backbone.blocks(variant)
    assert len(table) == 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("_blocks."))
    for i, (kernel, _stride, expand, filters_in, filters_out) in enumerate(table):
        depthwise = weights[f"_blocks.{i}._depthwise_conv.weight"]
        assert depthwise.shape == (filters_in * expand, 1, kernel, kernel)
        assert weights[f"_blocks.{i}._project_conv.weight"].shape[:2] == (filters_out, filters_in * expand)
    model = backbone.build(variant, weights)  # every tensor finds its layer, and nothing is left over
    assert model.output_shape == (None, backbone.FEATURES)


def test_weights_of_another_variant_are_refused(lite0) -> None:
    with pytest.raises(ValueError, match=r"do not fit|has no"):
        backbone.build(backbone.VARIANTS["lite1"], lite0[1])


def _same_padding(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """TensorFlow's "same": total padding from the output size, the odd pixel after (bottom/right)."""
    padded = []
    for size in x.shape[1:3]:
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        padded.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), padded[0], padded[1], (0, 0)))


def _conv(x: np.ndarray, weight: np.ndarray, stride: int, depthwise: bool = False) -> np.ndarray:
    """Direct convolution from the PyTorch-layout weight: (out, in, k, k), or (C, 1, k, k) depthwise."""
    kernel = weight.shape[-1]
    x = _same_padding(x, kernel, stride)
    _, height, width, _ = x.shape
    out_h, out_w = (height - kernel) // stride + 1, (width - kernel) // stride + 1
    result = 0.0
    for i in range(kernel):
        for j in range(kernel):
            patch = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride, :]
            if depthwise:
                result = result + patch * weight[:, 0, i, j]
            else:
                result = result + np.einsum("nhwc,oc->nhwo", patch, weight[:, :, i, j])
    return result


def _batch_norm(x: np.ndarray, weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    scale = weights[f"{name}.weight"] / np.sqrt(weights[f"{name}.running_var"] + 1e-3)
    return (x - weights[f"{name}.running_mean"]) * scale + weights[f"{name}.bias"]


def test_stem_and_first_block_equal_an_independent_numpy_computation(lite0) -> None:
    variant, weights = lite0
    model = backbone.build(variant, weights)
    probe = keras.Model(
        model.input, [model.get_layer("stem_bn_relu6").output, model.get_layer("block00_project_bn").output]
    )
    x = np.random.default_rng(1).uniform(-1, 1, (2, 33, 30, 3))  # odd sizes: the asymmetric padding matters
    stem = np.clip(_batch_norm(_conv(x, weights["_conv_stem.weight"].astype(np.float64), 2), weights, "_bn0"), 0, 6)
    block = np.clip(
        _batch_norm(
            _conv(stem, weights["_blocks.0._depthwise_conv.weight"], 1, depthwise=True), weights, "_blocks.0._bn1"
        ),
        0,
        6,
    )
    block = _batch_norm(
        np.einsum("nhwc,oc->nhwo", block, weights["_blocks.0._project_conv.weight"][:, :, 0, 0]),
        weights,
        "_blocks.0._bn2",
    )
    got_stem, got_block = (np.asarray(t) for t in probe(x.astype(np.float32)))
    assert got_stem.shape == stem.shape == (2, 17, 15, 32)
    np.testing.assert_allclose(got_stem, stem, atol=2e-4)
    np.testing.assert_allclose(got_block, block, atol=2e-3)


def test_imagenet_head_sees_daisies_in_dandelions_and_none_in_grass(lite0, data_dir: Path) -> None:
    """With the right padding and normalisation, "daisy" is the top ImageNet class for ~40 % of the dandelion
    photos and for no grass photo; a wrong port flattens that (about 19 % with the wrong padding)."""
    variant, weights = lite0
    model = backbone.build(variant, weights, imagenet_head=True)
    shares = {}
    for label in ("dandelion", "grass"):
        photos = sorted((data_dir / label).glob("*.jpg"))[:60]
        x = np.stack([preprocess(p.read_bytes()) for p in photos]) * (255 / 128) - 127 / 128
        top = np.asarray(model(x.astype(np.float32))).argmax(axis=1)
        shares[label] = float(np.mean(top == DAISY))
    assert shares["dandelion"] >= 0.3, shares
    assert shares["grass"] == 0.0, shares
