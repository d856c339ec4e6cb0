"""The one preprocessing: every mode becomes RGB in [0, 1], orientation is applied, bad input is refused."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

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
    assert decoded.mode == "RGB"
    palette = images.decode(encode(half_and_half((40, 30)).convert("P"), "PNG"))
    assert (palette.mode, palette.image.mode, palette.format) == ("P", "RGB", "PNG")  # the mode it had


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_s_exif_transpose(orientation: int) -> None:
    """Orientation 2 (mirrored) was never applied: its transposition, FLIP_LEFT_RIGHT, is 0 (found by mutmut)."""
    from PIL import ImageOps

    img = Image.new("RGB", (48, 32), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 24, 16))  # a red top-left quarter: every orientation moves it elsewhere
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(np.asarray(images.decode(data).image), expected)
    if orientation > 1:
        assert not np.array_equal(expected, np.asarray(img))


def test_a_phone_s_multi_picture_jpeg_is_its_first_picture() -> None:
    """An MPO (a JPEG followed by a preview or a depth map) is not an animation: it was refused as one."""
    buffer = io.BytesIO()
    photo, preview = half_and_half((800, 600)), Image.new("RGB", (160, 120), (0, 255, 0))
    photo.save(buffer, "MPO", save_all=True, append_images=[preview], quality=95)
    decoded = images.decode(buffer.getvalue())
    assert (decoded.format, decoded.width, decoded.height) == ("MPO", 800, 600)
    assert decoded.image.size == (400, 300)  # drafted as a JPEG: 1/2 keeps both sides >= 224
    rgb = np.asarray(decoded.image)
    assert rgb[150, 10].tolist()[0] > 240 and rgb[150, -10].tolist()[2] > 240  # red left, blue right


def test_a_large_jpeg_is_drafted_at_the_smallest_scale_that_keeps_the_size() -> None:
    """2000 x 1600: 1/8 would make 250 x 200 (under 224), so 1/4; a box reduction would have kept 1000 x 800."""
    decoded = images.decode(encode(half_and_half((2000, 1600)), "JPEG"))
    assert decoded.image.size == (500, 400)
    assert images.decode(encode(half_and_half((2000, 1600)), "JPEG"), size=64).image.size == (250, 200)


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
    with pytest.raises(NotAnImageError, match=r"^the image data is corrupt or truncated$"):
        preprocess(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (10_000, 10_000), 0), "PNG")  # 100 MP in a few KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError, match=r"^the image is 10000x10000 pixels; the limit is 40000000 pixels$"):
        preprocess(bomb)


def test_a_header_over_pillow_s_own_bomb_limit_is_refused_with_ours() -> None:
    """Over twice Pillow's ``MAX_IMAGE_PIXELS`` its ``open`` raises by itself, on the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # 400 MP, 8-bit grey
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLargeError, match=r"^the image is over the limit of 40000000 pixels$"):
        preprocess(data)


def test_file_over_the_byte_limit_is_refused() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageTooLargeError, match=f"^the file is {len(data)} bytes; the limit is {len(data) - 1}$"):
        preprocess(data, ImageLimits(max_bytes=len(data) - 1))
    preprocess(data, ImageLimits(max_bytes=len(data)))  # exactly at the limit: decoded


def test_an_empty_file_is_refused_as_such() -> None:
    with pytest.raises(NotAnImageError, match=r"^the file is empty$"):
        preprocess(b"")


@pytest.mark.parametrize(
    ("size", "limits", "message"),
    [
        ((10, 10), ImageLimits(max_pixels=99), "the image is 10x10 pixels; the limit is 99 pixels"),
        ((10, 10), ImageLimits(min_side=11), "the image is 10x10; each side must be at least 11"),
        ((40, 10), ImageLimits(max_aspect_ratio=3.5), "the image is 40x10; the aspect ratio may not exceed 3.5:1"),
        ((10, 40), ImageLimits(max_aspect_ratio=3.5), "the image is 10x40; the aspect ratio may not exceed 3.5:1"),
    ],
)
def test_geometry_limits_are_inclusive_and_say_which_was_passed(size, limits: ImageLimits, message: str) -> None:
    data = encode(Image.new("RGB", size), "PNG")
    with pytest.raises((ImageTooLargeError, DegenerateImageError), match=f"^{re.escape(message)}$"):
        preprocess(data, limits)
    at_limits = ImageLimits(max_pixels=size[0] * size[1], min_side=min(size), max_aspect_ratio=max(size) / min(size))
    preprocess(data, at_limits)  # each exactly at its limit: decoded


@pytest.mark.parametrize("size", [(1, 1), (4000, 10), (5, 100)])
def test_degenerate_geometry_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(DegenerateImageError):
        preprocess(encode(Image.new("RGB", size), "PNG"))


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(NotAnImageError, match=r"^animated images are not accepted; send a still image$"):
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


# ---------------------------------------------------------------- memory: the decode budget is bytes (issue #23)

WORST_CASES = [
    ("I;16", "PNG"),
    ("I;16", "TIFF"),
    ("I", "TIFF"),
    ("F", "TIFF"),
    ("L", "PNG"),
    ("1", "PNG"),
    ("P", "PNG"),
    ("P", "GIF"),
    ("RGB", "PNG"),
    ("RGB", "TIFF"),
    ("RGB", "WEBP"),
    ("RGBA", "PNG"),
    ("RGBA", "TIFF"),
    ("RGBA", "WEBP"),
    ("LA", "PNG"),
    ("CMYK", "TIFF"),
]
OPTIONS = {"TIFF": {"compression": "tiff_adobe_deflate"}, "WEBP": {"lossless": True}, "PNG": {"optimize": True}}

PEAK_SCRIPT = """
import re, sys
from shared import images
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
data = sys.stdin.buffer.read()
before = status("VmRSS")
array = images.preprocess(data)
print(status("VmHWM") - before, float(array.mean()))
"""


REPO = Path(images.__file__).resolve().parents[1]


def largest_allowed(mode: str, fmt: str, limits: ImageLimits = images.DEFAULT_LIMITS) -> tuple[Image.Image, int]:
    """A compressible picture (a gradient, not one flat value, so every page of the raster is written) of the
    largest square side this mode and format may have, and that side."""
    per_pixel = images.full_size_bytes_per_pixel(mode, fmt)
    side = int((min(limits.max_decode_bytes / per_pixel, limits.max_pixels)) ** 0.5)
    ramp = Image.linear_gradient("L").resize((side, side))
    if mode in ("I;16", "I"):
        return ramp.convert("I").point(lambda v: v * 200).convert(mode), side
    if mode in ("F", "L", "1"):
        return ramp.convert(mode), side
    colour = Image.merge("RGB", [ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp])
    if mode in ("RGBA", "LA"):  # a real alpha channel: an opaque one may be dropped by the encoder
        colour = colour.convert(mode)
        colour.putalpha(ramp.transpose(Image.Transpose.ROTATE_180).point(lambda v: 64 + v // 2))
        return colour, side
    return colour.quantize(64) if mode == "P" else colour.convert(mode), side


@pytest.mark.parametrize(("mode", "fmt"), WORST_CASES, ids=[f"{m}-{f}" for m, f in WORST_CASES])
def test_the_worst_allowed_decode_of_each_mode_stays_within_the_budget(mode: str, fmt: str) -> None:
    """The largest image each mode may be decodes with a peak of at most the budget (+ 8 MiB of working
    memory), in a fresh process; one more row is refused before decoding. The probe's 75 KB 16-bit PNG of
    6300 x 6300 once peaked at ~1 GB."""
    import subprocess
    import sys

    img, side = largest_allowed(mode, fmt)
    data = encode(img, fmt, **OPTIONS.get(fmt, {}))
    assert len(data) < images.DEFAULT_LIMITS.max_bytes
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], input=data, capture_output=True, check=True, cwd=REPO)
    peak, mean = done.stdout.split()
    budget = images.DEFAULT_LIMITS.max_decode_bytes
    assert int(peak) <= budget + 8 * 2**20, f"peak {int(peak) / 2**20:.0f} MiB for a budget of {budget / 2**20:.0f}"
    assert 0.05 < float(mean) < 0.95  # the gradient came through, not a blank
    taller = encode(img.resize((side, side + side // 50 + 1), Image.Resampling.NEAREST), fmt, **OPTIONS.get(fmt, {}))
    with pytest.raises(ImageTooLargeError):  # by the budget, or by the pixel cap where that is reached first
        images.decode(taller)


def test_sixteen_bit_probe_image_is_refused_or_cheap_and_right() -> None:
    """The probe's image: 75 KB, 6300 x 6300, 16-bit. Within the budget at 2 bytes a pixel: decoded reduced,
    its values scaled, not clipped."""
    img = Image.fromarray(np.full((6300, 6300), 16384, np.uint16))
    data = encode(img, "PNG", optimize=True)
    decoded = images.decode(data)
    assert (decoded.width, decoded.height) == (6300, 6300)
    assert max(decoded.image.size) < 1000  # reduced before anything else
    np.testing.assert_allclose(preprocess(data).mean(), 0.25, atol=2 / 255)


def test_large_images_are_reduced_before_rotation_and_keep_their_orientation() -> None:
    img = half_and_half((2400, 1200)).convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = images.decode(encode(img, "PNG", exif=exif))
    assert max(decoded.image.size) < 1500  # reduced (by whole factors per side: the model squares it anyway)
    array = preprocess(encode(img, "PNG", exif=exif))
    assert array[10, MODEL_SIZE // 2, 0] > 0.9 and array[-10, MODEL_SIZE // 2, 2] > 0.9


# ---------------------------------------------------------------- formats: one allow-list (issue #23)


def other_format(fmt: str) -> bytes:
    if fmt == "EPS":
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n{ } loop\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Pillow deprecates writing IM; a client may still send it
        return encode(Image.new("1" if fmt == "XBM" else "RGB", (64, 64)), fmt)


REFUSED_FORMATS = ["EPS", "PPM", "TGA", "PCX", "SGI", "ICNS", "DDS", "IM", "QOI", "ICO", "XBM", "JPEG2000"]


@pytest.mark.parametrize("fmt", REFUSED_FORMATS)
def test_formats_outside_the_list_are_refused_with_the_list(fmt: str) -> None:
    with pytest.raises((images.UnsupportedFormatError, NotAnImageError)) as refused:
        images.decode(other_format(fmt))
    assert images.ACCEPTED in str(refused.value)


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "PCX", "SGI", "ICNS", "DDS", "QOI", "ICO", "XBM"])
def test_a_known_format_is_told_apart_from_garbage(fmt: str) -> None:
    with pytest.raises(images.UnsupportedFormatError, match=fmt):
        images.decode(other_format(fmt))


def test_every_accepted_format_decodes() -> None:
    for fmt in images.ACCEPTED_FORMATS:
        check_array(preprocess(encode(Image.new("RGB", (32, 32), (0, 90, 0)), fmt)))
    assert images.EXTENSIONS.keys() - {"MPO"} == set(images.ACCEPTED_FORMATS)


def first_row(data: bytes, n: int) -> list[int]:
    """The first ``n`` pixels of the decoded image's top row (all three channels equal: grey)."""
    rgb = np.asarray(images.decode(data, images.DEFAULT_LIMITS, MODEL_SIZE).image)
    assert (rgb[0, :n] == rgb[0, :n, :1]).all(), "a grey image came out coloured"
    return rgb[0, :n, 0].tolist()


def grey(mode: str, values: list[float], dtype: str) -> Image.Image:
    array = np.zeros((32, 32), dtype)
    array[0, : len(values)] = values
    return Image.frombytes(mode, (32, 32), array.tobytes())


@pytest.mark.parametrize(
    ("mode", "dtype", "fmt", "values", "expected"),
    [
        # 16-bit: always out of 65535 (mutmut: scale, clip and the mode names of shared.images._to_rgb)
        ("I;16", "<u2", "PNG", [0, 65535, 32896, 257], [0, 255, 128, 1]),
        ("I;16B", ">u2", "TIFF", [0, 65535, 32896, 257], [0, 255, 128, 1]),
        ("I;16", "<u2", "PNG", [0, 128, 255], [0, 0, 0]),  # a dark 16-bit image stays dark
        # 32-bit integers: out of 255 while they fit it (the top value included), out of 65535 beyond
        ("I", "<i4", "TIFF", [0, 200, 255], [0, 200, 255]),
        ("I", "<i4", "TIFF", [0, 256], [0, 0]),
        ("I", "<i4", "TIFF", [-1000, 0, 1000, 70000], [0, 0, 3, 255]),  # negatives clip to 0, never wrap
        # floats: out of 1 while they fit it, out of 255 beyond; NaN and infinities are black
        ("F", "<f4", "TIFF", [0.0, 0.5, 1.0, np.nan], [0, 127, 255, 0]),
        ("F", "<f4", "TIFF", [0.0, 100.0, 255.0, np.inf, -np.inf, 300.0], [0, 100, 255, 0, 0, 255]),
        ("F", "<f4", "TIFF", [0.0, 1.5, 2.0, -100.0], [0, 1, 2, 0]),  # just over 1: out of 255; negatives clip
        ("F", "<f4", "TIFF", [0.0, 1.0, -0.5], [0, 255, 0]),
    ],
)
def test_wide_greyscale_modes_become_the_8_bit_values_they_stand_for(
    mode: str, dtype: str, fmt: str, values: list[float], expected: list[int]
) -> None:
    data = encode(grey(mode, values, dtype), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert first_row(data, len(values)) == expected


@pytest.mark.parametrize(("fmt", "transparent"), [("PNG", True), ("PNG", False), ("GIF", False)])
def test_large_palette_images_are_reduced_in_colour_and_keep_their_transparency(fmt: str, transparent: bool) -> None:
    """Over twice the reducing size, images are box-reduced first: a palette image by its colours (not its
    indices), its transparent colour still flattened onto white, and a 2 x 2 block across the edge half of each."""
    img = Image.new("P", (1400, 1400), 0)
    img.putpalette([200, 10, 10, 0, 255, 0] + [0] * 762)
    img.paste(1, (701, 0, 1400, 1400))  # column 700 is the first colour, 701 the second: one block holds both
    data = encode(img, fmt, **({"transparency": 0} if transparent else {}))
    rgb = np.asarray(images.decode(data, images.DEFAULT_LIMITS, MODEL_SIZE).image)
    assert rgb.shape[0] < 1400  # it was reduced
    assert rgb[5, 5].tolist() == ([255, 255, 255] if transparent else [200, 10, 10])
    assert rgb[5, -5].tolist() == [0, 255, 0]
    assert rgb[5, 350].tolist() == ([127, 255, 127] if transparent else [100, 133, 5])  # reduced with its alpha


def test_large_one_bit_images_are_reduced_as_grey() -> None:
    img = Image.new("1", (1400, 1400), 0)
    img.paste(1, (700, 0, 1400, 1400))
    rgb = np.asarray(images.decode(encode(img, "PNG"), images.DEFAULT_LIMITS, MODEL_SIZE).image)
    assert rgb.shape[0] < 1400
    assert rgb[5, 5].tolist() == [0, 0, 0] and rgb[5, -5].tolist() == [255, 255, 255]


def test_grey_with_alpha_is_flattened_onto_white() -> None:
    img = Image.new("LA", (32, 32), (0, 0))
    img.paste((0, 255), (16, 0, 32, 32))
    rgb = np.asarray(images.decode(encode(img, "PNG"), images.DEFAULT_LIMITS, MODEL_SIZE).image)
    assert rgb[2, 2].tolist() == [255, 255, 255] and rgb[2, 30].tolist() == [0, 0, 0]


def test_other_sizes_are_honoured() -> None:
    assert preprocess(encode(half_and_half((300, 200)), "PNG"), size=96).shape == (96, 96, 3)


PINNED_DIGESTS = {
    "dandelion": "afa4bdb37c54d0e364aa6971cd50fc2045a1e34b5e3f9797e96dba90dc8e4af2",
    "grass": "4161915d7a57d36132aaa5be40b4c7abbc75f8db0d3c2ab7c7e66ae21723f5ae",
}
"""sha256 of ``preprocess`` of the first photo of each class (Pillow as pinned in constraints.txt)."""
PINNED_LARGE_DIGESTS = {
    "rgb": "89286203ef0a1471aea3480b3af939cc1ad041c98b0ea7e9bcb7501f275f7cc4",
    "16-bit": "d9d1de5eabeacfa7c5923b3b35f777d1e04c8b0c648c0d8d49290897a86c4f95",
}


def test_the_preprocessing_is_pinned(data_dir) -> None:
    """Cached embeddings are keyed by photo, backbone, resolution and view, not by preprocessing: a change here
    (resampling filter, scaling, rounding) would leave every stored embedding computed the old way. If you
    change the preprocessing on purpose, give ``services.trainer.extractor.EmbeddingSpec`` a new key too (so
    they are recomputed), then these digests."""
    import hashlib

    for label, digest in PINNED_DIGESTS.items():
        photo = sorted((data_dir / label).glob("*.jpg"))[0]
        assert hashlib.sha256(preprocess(photo.read_bytes()).tobytes()).hexdigest() == digest, label
    # Large inputs take the other steps: a box reduction of whole factors in the image's own mode (16-bit
    # included), then the resize's own reduction (reducing_gap) before the bilinear filter.
    rng = np.random.default_rng(5)
    large = {
        "rgb": Image.fromarray(rng.integers(0, 256, (1000, 1300, 3), dtype=np.uint8), "RGB"),
        "16-bit": Image.fromarray(rng.integers(0, 65536, (1400, 1500), dtype=np.uint16)),
    }
    for name, digest in PINNED_LARGE_DIGESTS.items():
        array = preprocess(encode(large[name], "PNG"))
        assert hashlib.sha256(array.tobytes()).hexdigest() == digest, name


@pytest.mark.parametrize(
    ("mode", "fmt", "expected"),
    [
        ("L", "PNG", 1),
        ("P", "PNG", 9),  # and its RGB(A) copy, made before it can be reduced
        ("1", "PNG", 2),  # and its L copy
        ("I;16", "PNG", 2),
        ("I", "TIFF", 4),
        ("F", "TIFF", 4),
        ("RGB", "PNG", 4),
        ("RGBA", "PNG", 8),  # and the premultiplied copy reduce() makes
        ("LA", "PNG", 8),
        ("RGB", "WEBP", 16),  # and libwebp's buffers
    ],
)
def test_the_decode_budget_counts_the_measured_bytes_of_each_mode(mode: str, fmt: str, expected: int) -> None:
    """The figures ``test_the_worst_allowed_decode_of_each_mode_stays_within_the_budget`` measured (slow)."""
    assert images.full_size_bytes_per_pixel(mode, fmt) == expected


def test_an_image_over_the_decode_budget_is_refused_with_its_figures() -> None:
    data = encode(Image.new("RGB", (3000, 2000)), "PNG")  # 24 MB decoded; 2000 x 2000 would be 16 MB
    limits = ImageLimits(max_decode_bytes=16 * 1024 * 1024)
    with pytest.raises(ImageTooLargeError) as refused:
        images.decode(data, limits)
    assert str(refused.value) == (
        "the image is 3000x2000 pixels of mode RGB: decoding it needs 23 MiB; the limit is 16 MiB"
    )
    images.decode(data, ImageLimits(max_decode_bytes=24_000_000))  # exactly at the budget: decoded


@pytest.mark.parametrize(
    ("size", "reduced"),
    [((1343, 1343), (1343, 1343)), ((1344, 1000), (672, 1000)), ((1400, 700), (700, 700)), ((700, 1400), (700, 700)),
     ((2100, 2800), (700, 700))],
)  # fmt: skip
def test_only_sides_of_twice_the_reducing_size_are_box_reduced(size: tuple[int, int], reduced: tuple[int, int]) -> None:
    """Each side by its own whole factor, to at least 3 x 224 = 672 px: nothing full-size reaches the rotation,
    the conversion or the floats (and the resize's own reducing_gap of 3 would reduce by the same factors)."""
    decoded = images.decode(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"))
    assert decoded.image.size == reduced and (decoded.width, decoded.height) == size


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
@pytest.mark.parametrize("size", [(40, 20), (1400, 700)])
def test_a_transparent_colour_is_flattened_onto_white_too(mode: str, size: tuple[int, int]) -> None:
    """An RGB or grey PNG (8 or 16 bits) may name one colour transparent (tRNS) instead of carrying alpha: it is
    flattened onto white like alpha is (it used to show as its colour, black here: found by mutmut on _to_rgb;
    a 16-bit grey key was lost when the levels were scaled to 8 bits)."""
    key = (0, 0, 0) if mode == "RGB" else 0
    other = {"RGB": (200, 10, 10), "L": 90, "I;16": 90 * 257}[mode]
    img = Image.new(mode, size, other)
    img.paste(key, (0, 0, size[0] // 2, size[1]))
    rgb = np.asarray(images.decode(encode(img, "PNG", transparency=key)).image)
    assert rgb[5, 5].tolist() == [255, 255, 255]
    assert rgb[5, -5].tolist() == ([200, 10, 10] if mode == "RGB" else [90, 90, 90])
    assert np.asarray(images.decode(encode(img, "PNG")).image)[5, 5].tolist() == [0, 0, 0]  # without tRNS: black


def test_modes_no_decoder_here_hands_out_are_converted_alike() -> None:
    """Little-endian and native 16-bit, and the alpha modes ``PA`` and premultiplied ``RGBa``: a Pillow plugin
    or version may hand them out, and ``_to_rgb`` promises any mode (but ``La``, which Pillow cannot convert)."""
    for mode in ("I;16L", "I;16N"):
        img = Image.frombytes(mode, (4, 1), np.array([0, 65535, 32896, 257], "=u2").tobytes())
        assert np.asarray(images._to_rgb(img))[0, :, 0].tolist() == [0, 255, 128, 1], mode
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pa.putpixel((0, 0), (1, 0))
    pa.putpixel((1, 0), (1, 255))
    rgba = Image.new("RGBa", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 200, 30, 255))
    for img, opaque in ((pa, [10, 200, 30]), (rgba, [10, 200, 30])):
        rgb = np.asarray(images._to_rgb(img))
        assert rgb[0].tolist() == [[255, 255, 255], opaque], img.mode


def test_a_known_format_is_named_even_when_another_s_check_fails_on_few_bytes() -> None:
    """``b"P6"`` makes the DIB check raise (it needs more bytes) before the PPM check names it."""
    with pytest.raises(images.UnsupportedFormatError, match=r"\(PPM, by its first bytes\)"):
        preprocess(b"P6")
    with pytest.raises(NotAnImageError, match=r"^the image data is corrupt or truncated$"):
        preprocess(b"\xff\xd8\xff")  # starts like a JPEG


def test_the_budget_s_figures_are_in_mebibytes() -> None:
    with pytest.raises(ImageTooLargeError, match=r"needs 2048 MiB; the limit is 128 MiB$"):
        images._check_budget((16384, 16384), "RGBA", "PNG", images.DEFAULT_LIMITS)


def test_another_size_is_decoded_for_that_size() -> None:
    """The early reduction and the JPEG draft aim at the size asked for, not the model's."""
    rng = np.random.default_rng(3)
    data = encode(Image.fromarray(rng.integers(0, 256, (900, 2000, 3), dtype=np.uint8), "RGB"), "JPEG")
    small = preprocess(data, size=64)
    assert np.array_equal(small, images.to_array(images.decode(data, size=64).image, 64))
    assert not np.array_equal(small, images.to_array(images.decode(data).image, 64))
