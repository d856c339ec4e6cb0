"""The one preprocessing: every mode becomes RGB in [0, 1], orientation is applied, bad input is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared import images
from shared.images import (
    MODEL_SIZE,
    DegenerateImageError,
    ImageLimits,
    ImageTooLargeError,
    NotAnImageError,
    preprocess,
)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def half_and_half(size: tuple[int, int] = (64, 32)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


def check_array(array: np.ndarray) -> None:
    assert array.shape == (MODEL_SIZE, MODEL_SIZE, 3)
    assert array.dtype == np.float32
    assert 0.0 <= array.min() <= array.max() <= 1.0


@pytest.mark.parametrize(
    ("mode", "fmt", "color", "expected"),
    [
        ("RGB", "JPEG", (200, 100, 50), (200, 100, 50)),
        ("L", "PNG", 128, (128, 128, 128)),
        ("L", "JPEG", 64, (64, 64, 64)),
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),
        ("RGB", "WEBP", (10, 200, 30), (10, 200, 30)),
        ("RGB", "BMP", (1, 2, 3), (1, 2, 3)),
        ("RGB", "TIFF", (90, 80, 70), (90, 80, 70)),
    ],
)
def test_modes_become_rgb_in_unit_range(mode: str, fmt: str, color: object, expected: tuple[int, int, int]) -> None:
    data = encode(Image.new(mode, (50, 40), color), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    array = preprocess(data)
    check_array(array)
    np.testing.assert_allclose(array.reshape(-1, 3).mean(axis=0), np.array(expected) / 255, atol=6 / 255)


def test_palette_image() -> None:
    img = Image.new("RGB", (30, 30), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    array = preprocess(encode(img, "PNG"))
    check_array(array)
    np.testing.assert_allclose(array[0, 0], [0, 128 / 255, 0], atol=2 / 255)


def test_transparency_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (10, 0, 20, 20))  # right half fully transparent black
    array = preprocess(encode(img, "PNG"))
    np.testing.assert_allclose(array[MODEL_SIZE // 2, 5], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(array[MODEL_SIZE // 2, -5], [1, 1, 1], atol=1e-6)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 8, 16))
    array = preprocess(encode(img, "PNG", transparency=0))
    np.testing.assert_allclose(array[0, 0], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(array[0, -1], [1, 1, 1], atol=1e-6)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    array = preprocess(encode(img, "PNG"))
    check_array(array)
    np.testing.assert_allclose(array.mean(), 0.5, atol=2 / 255)


def test_exif_orientation_is_applied() -> None:
    img = half_and_half((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    data = encode(img, "JPEG", exif=exif, quality=95)
    decoded = images.decode(data)
    assert decoded.image.size == (32, 64)
    array = preprocess(data)
    assert array[10, MODEL_SIZE // 2, 0] > 0.9  # top is the former left half: red
    assert array[-10, MODEL_SIZE // 2, 2] > 0.9  # bottom is the former right half: blue


def test_original_size_and_format_are_reported() -> None:
    decoded = images.decode(encode(half_and_half((275, 183)), "JPEG"))
    assert (decoded.width, decoded.height, decoded.format, decoded.image.mode) == (275, 183, "JPEG", "RGB")


def test_large_jpeg_is_decoded_in_draft_mode_to_the_same_picture() -> None:
    big = half_and_half((2000, 1000))
    array = preprocess(encode(big, "JPEG", quality=90))
    assert array[MODEL_SIZE // 2, 10, 0] > 0.9 and array[MODEL_SIZE // 2, -10, 2] > 0.9


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotAnImageError),
        (b"hello, I am a text file named photo.jpg\n", NotAnImageError),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF", NotAnImageError),
        (b"<html><body>not an image</body></html>", NotAnImageError),
        (bytes(range(256)) * 40, NotAnImageError),
    ],
)
def test_non_images_are_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        preprocess(data)


def test_truncated_jpeg_is_refused() -> None:
    data = encode(Image.effect_noise((300, 200), 60).convert("RGB"), "JPEG")
    with pytest.raises(NotAnImageError):
        preprocess(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (10_000, 10_000), 0), "PNG")  # 100 MP in a few KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError):
        preprocess(bomb)


def test_file_over_the_byte_limit_is_refused() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageTooLargeError):
        preprocess(data, ImageLimits(max_bytes=len(data) - 1))


@pytest.mark.parametrize("size", [(1, 1), (4000, 10), (5, 100)])
def test_degenerate_geometry_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(DegenerateImageError):
        preprocess(encode(Image.new("RGB", size), "PNG"))


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(NotAnImageError, match="animated"):
        preprocess(buffer.getvalue())


def test_single_frame_gif_is_accepted() -> None:
    check_array(preprocess(encode(Image.new("RGB", (32, 32), (0, 0, 255)), "GIF")))


def test_errors_carry_machine_readable_codes() -> None:
    assert {NotAnImageError.code, ImageTooLargeError.code, DegenerateImageError.code} == {
        "not_an_image",
        "image_too_large",
        "degenerate_image",
    }


def test_real_photos_preprocess(data_dir) -> None:
    for path in sorted((data_dir / "dandelion").glob("*.jpg"))[:3] + sorted((data_dir / "grass").glob("*.jpg"))[:3]:
        check_array(preprocess(path.read_bytes()))
