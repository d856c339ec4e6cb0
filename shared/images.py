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
from PIL import Image, ImageOps, UnidentifiedImageError

MODEL_SIZE = 224
"""Side of the square array the model takes (the seed's 224 x 224 contract)."""
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


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an input may be before it is refused. Defaults are safe for a public endpoint."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
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


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, draft_size: int | None = None) -> DecodedImage:
    """Decode ``data`` into an upright 8-bit RGB Pillow image, or raise an :class:`ImageError`.

    ``draft_size`` lets the JPEG decoder scale down by a power of two while decoding (much faster on
    large photos) as long as both sides stay at least that large.
    """
    if not data:
        raise NotAnImageError("the file is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the file is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between 1x and 2x its own bomb limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_geometry(width, height, limits)
            if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
                raise NotAnImageError("animated images are not accepted; send a still image")
            fmt = img.format or "unknown"
            mode = img.mode
            if draft_size and fmt == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the image is over the limit of {limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError("the file is not a decodable image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        # Truncated or corrupt data surfaces as any of these from Pillow's plugins.
        raise NotAnImageError("the image data is corrupt or truncated") from exc
    return DecodedImage(image=_to_rgb(img), width=width, height=height, format=fmt, mode=mode)


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
    """8-bit RGB from any Pillow mode; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip everything above 255.
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        top = 1.0 if array.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
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
    return to_array(decode(data, limits, draft_size=size).image, size)
