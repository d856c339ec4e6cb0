"""Descriptive statistics of one image: the columns of the feature store and of input-drift checks.

Computed on the preprocessed model-size image, so training data and live inputs are described by the
same numbers whatever their original resolution.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from shared.images import MODEL_SIZE

COLOR_COLUMNS: tuple[str, ...] = tuple(
    f"{space}_{channel}_{stat}"
    for space, channels in (("rgb", "rgb"), ("hsv", "hsv"))
    for channel in channels
    for stat in ("mean", "std")
)
DESCRIPTOR_COLUMNS: tuple[str, ...] = ("width", "height", *COLOR_COLUMNS)


def describe(rgb: Image.Image, width: int, height: int, size: int = MODEL_SIZE) -> dict[str, float]:
    """``width``/``height`` of the original, then mean and std of each RGB and HSV channel in [0, 1]."""
    small = rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)
    values: dict[str, float] = {"width": float(width), "height": float(height)}
    for space, img in (("rgb", small), ("hsv", small.convert("HSV"))):
        pixels = np.asarray(img, dtype=np.float32).reshape(-1, 3) * (1.0 / 255.0)
        means, stds = pixels.mean(axis=0), pixels.std(axis=0)
        for i, channel in enumerate(space):
            values[f"{space}_{channel}_mean"] = float(means[i])
            values[f"{space}_{channel}_std"] = float(stds[i])
    return values
