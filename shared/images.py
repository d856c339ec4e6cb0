"""The one image preprocessing: bytes -> validated RGB -> resized float32 array in [0, 1].

Training and serving both call :func:`preprocess`, so a photo is seen by the model the same way when it
is learnt from and when it is classified. Everything a hostile or odd upload can do (not an image, a
decompression bomb, an animation, a 16-bit or CMYK file, an EXIF rotation) is decided here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

MODEL_SIZE = 224
"""Side of the square array the model takes (the seed's 224 x 224 contract)."""
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The only formats Pillow may open (the JPEG opener also takes MPO, the multi-picture JPEG of many phones).
Every ``Image.open`` of data from outside passes this list, so no other plugin parses it: EPS would hand it
to Ghostscript."""
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
""":data:`ACCEPTED_FORMATS` as people read it: what error messages, the page and the README quote."""
REDUCING_GAP = 3
"""An image is box-reduced early to at least this many times the model's side (as :func:`to_array`'s
resize would do later), so nothing full-size is converted or turned into floats."""

# A PNG's text chunks are metadata we never read: 64 MiB of decompressed text (Pillow's default) is a bomb.
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
"""File extension of an image file by its Pillow format: ingested photos and kept uploads are named by it."""
MIME_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
              "BMP": "image/bmp", "TIFF": "image/tiff"}  # fmt: skip


class ImageError(ValueError):
    """Base of every reason an upload is refused as an image."""

    code = "invalid_image"


class NotAnImageError(ImageError):
    code = "not_an_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class DegenerateImageError(ImageError):
    code = "degenerate_image"


class UnsupportedFormatError(ImageError):
    """A known image format that is not accepted (EPS, TGA, ICO, ...): refused before any decoder runs."""

    code = "unsupported_format"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an input may be before it is refused. Defaults are safe for a public endpoint."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_decode_bytes: int = 128 * 1024 * 1024
    """Memory one decode may hold: pixels x the bytes per pixel of every full-size form the image takes
    (its decoded mode, and RGB(A) for palette images, which are converted before they are reduced). A
    75 KB 16-bit PNG of 6300 x 6300 is 40 MP, within ``max_pixels``, and once cost a gigabyte."""
    min_side: int = 8
    max_aspect_ratio: float = 20.0


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A validated, upright RGB image and what it was before conversion."""

    image: Image.Image
    width: int
    height: int
    format: str
    mode: str


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, size: int = MODEL_SIZE) -> DecodedImage:
    """Decode ``data`` into an upright 8-bit RGB Pillow image, or raise an :class:`ImageError`.

    The image is made small early: a JPEG decodes at a power-of-two scale (``draft``), anything else is
    box-reduced right after decoding, in its own mode, to about :data:`REDUCING_GAP` times ``size`` a side;
    only then is it rotated, converted to RGB or turned into floats. What a decode may hold at full size is
    checked against ``limits.max_decode_bytes`` before a pixel is decoded.
    """
    if not data:
        raise NotAnImageError("the file is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the file is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between 1x and 2x its own bomb limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = img.size
            _check_geometry(width, height, limits)
            fmt = img.format or "unknown"
            # A phone's MPO holds the photo first, then a preview or a depth map: the photo is decoded. Pillow
            # calls any file of several frames "animated".
            if getattr(img, "is_animated", False) and fmt != "MPO":
                raise NotAnImageError("animated images are not accepted; send a still image")
            mode = img.mode
            if fmt in ("JPEG", "MPO"):
                img.draft("RGB", (size, size))  # scales by 1/2, 1/4 or 1/8 while both sides stay >= size
            _check_budget(img.size, img.mode, fmt, limits)
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            img.load()
            img = _shrink(img, size * REDUCING_GAP)
            if (method := ORIENTATIONS.get(orientation)) is not None:  # FLIP_LEFT_RIGHT is 0: test for None
                img = img.transpose(method)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the image is over the limit of {limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        known = _known_format(data)
        if known in ACCEPTED_FORMATS:  # starts like an accepted format, but its header does not parse
            raise NotAnImageError("the image data is corrupt or truncated") from exc
        if known is not None:
            raise UnsupportedFormatError(
                f"this file's format ({known}, by its first bytes) is not accepted; send {ACCEPTED}"
            ) from exc
        raise NotAnImageError(f"the file is not a decodable image ({ACCEPTED})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        # Truncated or corrupt data surfaces as any of these from Pillow's plugins.
        raise NotAnImageError("the image data is corrupt or truncated") from exc
    return DecodedImage(image=_to_rgb(img), width=width, height=height, format=fmt, mode=mode)


ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that makes the image upright (as ``ImageOps.exif_transpose``)."""


def full_size_bytes_per_pixel(mode: str, fmt: str | None = None) -> int:
    """Bytes per pixel a decode holds at full size, measured per mode and format (peak RSS of one decode,
    ``tests/shared/test_images.py`` pins it): Pillow's own storage (1 byte for 1/L/P, 2 for 16-bit
    greyscale, 4 for every other mode, RGB and LA included); the RGB(A) copy of a palette image and the L copy
    of a 1-bit one, which cannot be reduced unconverted; the premultiplied copy that reducing RGBA and LA
    makes; and libwebp's decoded buffers, which Pillow copies from."""
    storage = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    conversion = {"P": 8, "1": 1, "RGBA": 4, "LA": 4}.get(mode, 0)
    decoder = 12 if fmt == "WEBP" else 0
    return storage + conversion + decoder


def _check_budget(size: tuple[int, int], mode: str, fmt: str, limits: ImageLimits) -> None:
    needed = size[0] * size[1] * full_size_bytes_per_pixel(mode, fmt)
    if needed > limits.max_decode_bytes:
        mib = 1024 * 1024
        raise ImageTooLargeError(
            f"the image is {size[0]}x{size[1]} pixels of mode {mode}: decoding it needs {needed / mib:.0f} MiB; "
            f"the limit is {limits.max_decode_bytes / mib:.0f} MiB"
        )


def _shrink(img: Image.Image, target: int) -> Image.Image:
    """Box-reduce ``img`` by whole factors so that each side stays at least ``target`` (or as it was)."""
    fx, fy = max(1, img.width // target), max(1, img.height // target)
    if fx == 1 and fy == 1:
        return img
    if img.mode == "P":  # reduce() has no palette arithmetic; resize() would pick nearest pixels
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode.startswith("I;16"):  # no reduce() for 16-bit either, but a box resize works in place
        return img.resize((-(-img.width // fx), -(-img.height // fy)), Image.Resampling.BOX)
    return img.reduce((fx, fy))


def _known_format(data: bytes) -> str | None:
    """The name of the format ``data`` starts like, among every format Pillow knows (checked by prefix only,
    no plugin parses it); None when it looks like no image at all."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # an accept() that needs more bytes than the prefix: not this one
            continue
    return None


def _check_geometry(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise DegenerateImageError(f"the image is {width}x{height}; each side must be at least {limits.min_side}")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise DegenerateImageError(
            f"the image is {width}x{height}; the aspect ratio may not exceed {limits.max_aspect_ratio:g}:1"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency (an alpha channel or a transparent colour) is flattened onto
    white. Called on the reduced image."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip everything above 255.
        array = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        key = img.info.get("transparency")  # a 16-bit PNG's transparent grey level (tRNS), lost by the scaling
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
        if isinstance(key, int):
            img.putalpha(Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), mode="L"))
    elif img.mode == "F":
        array = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if array.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):  # a palette index, or one colour (tRNS)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):  # not La: Pillow cannot convert it at all
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_array(img: Image.Image, size: int = MODEL_SIZE) -> np.ndarray:
    """Resize (aspect ratio not kept, as the model was trained) and scale to float32 ``(size, size, 3)``."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.asarray(img, dtype=np.float32)
    array *= 1.0 / 255.0
    return array


def preprocess(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, size: int = MODEL_SIZE) -> np.ndarray:
    """Bytes of an image file -> float32 ``(size, size, 3)`` in [0, 1]. Raises :class:`ImageError`."""
    return to_array(decode(data, limits, size).image, size)
