"""An ``/invocations`` input is described by the pixels it stands for: the same numbers as its 8-bit image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from shared.descriptors import describe, describe_array


def test_an_array_is_described_as_its_rounded_8_bit_image() -> None:
    x = np.random.default_rng(3).random((224, 224, 3), dtype=np.float32)
    pixels = np.floor(x.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    assert describe_array(x) == describe(Image.fromarray(pixels, "RGB"), 224, 224)


def test_values_outside_0_1_and_not_numbers_are_clipped_not_wrapped() -> None:
    """NaN reads as black, infinities and out-of-range values as the nearest end (never wrapped modulo 256)."""
    x = np.full((224, 224, 3), 0.5, np.float32)
    x[0, :4] = [[np.nan] * 3, [np.inf] * 3, [-np.inf] * 3, [7.0] * 3]
    x[1, 0] = -3.0
    pixels = np.full((224, 224, 3), 128, np.uint8)
    pixels[0, :4] = [[0] * 3, [255] * 3, [0] * 3, [255] * 3]
    pixels[1, 0] = 0
    assert describe_array(x) == describe(Image.fromarray(pixels, "RGB"), 224, 224)
