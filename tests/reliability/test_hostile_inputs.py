"""One corpus of hostile requests, and one of odd-but-valid images, against the app with the fake model.

Every hostile request must be refused with a 4xx ``{"error_code", "message"}`` that does not echo the
payload; every odd-but-valid image must be classified; degenerate images get their documented refusal.
Nothing may ever answer 5xx.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

MARKER = b"HOSTILE-7f3a9c"
"""Put into payloads so that an echo of them in an error is easy to spot."""

JSON = {"content-type": "application/json"}
BOMB = (400, 413)
"""Over our pixel limit -> 413; over twice Pillow's own bomb limit Pillow refuses to open it first -> 400."""


def encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


JPEG = encoded(photo(), "JPEG")
PNG = encoded(photo(), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` and whose data is a few bytes: the cheapest bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zero_bomb() -> bytes:
    """A real 20000 x 20000 PNG of zeros (400 Mpx decoded) that is only tens of KB on the wire."""
    return encoded(Image.new("1", (20_000, 20_000)), "PNG", optimize=True)


def seed(n: int = 1, value: float = 0.5) -> list:
    return np.full((n, 224, 224, 3), value, np.float32).tolist()


def big_body_with(token: bytes) -> bytes:
    """A full-size ``{"inputs": [one image]}`` (takes the simdjson fast path) with its first number replaced."""
    body = orjson.dumps({"inputs": seed()})
    return body.replace(b"0.5", token, 1)


@dataclass(frozen=True)
class Case:
    path: str
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    statuses: tuple[int, ...] = (400,)


def upload(name: str, data: bytes, content_type: str = "image/jpeg", count: int = 1) -> Case:
    return Case("/predict", files=[("file", (name, data, content_type))] * count, statuses=(400,))


def invocation(body: bytes, statuses: tuple[int, ...] = (400,), content_type: str = "application/json") -> Case:
    return Case("/invocations", content=body, headers={"content-type": content_type}, statuses=statuses)


HOSTILE: dict[str, Case] = {
    # /predict: things that are not images, or not uploads
    "zero-bytes": upload("empty.jpg", b""),
    "truncated-jpeg": upload("cut.jpg", JPEG[: len(JPEG) // 2]),
    "jpeg-header-only": upload("head.jpg", JPEG[:20]),
    "truncated-png": upload("cut.png", PNG[: len(PNG) // 3], "image/png"),
    "text-named-jpg": upload("notes.jpg", b"plain text " + MARKER * 20),
    "pdf-named-jpg": upload("doc.jpg", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n" + MARKER + b"\n%%EOF"),
    "html-named-jpg": upload("page.jpg", b"<!doctype html><script>alert('" + MARKER + b"')</script>"),
    "svg-named-png": upload("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg"><!--' + MARKER + b"--></svg>"),
    "random-bytes": upload("noise.jpg", np.random.default_rng(1).bytes(50_000)),
    "jpeg-magic-then-garbage": upload("magic.jpg", b"\xff\xd8\xff\xe0" + MARKER * 100),
    "png-lying-header-65535": Case(
        "/predict", files=[("file", ("liar.png", png_header_only(65_535, 65_535), "image/png"))], statuses=BOMB
    ),
    "png-zero-width": Case("/predict", files=[("file", ("zero.png", png_header_only(0, 10), "image/png"))]),
    "bomb-between-the-limits-10000x10000": Case(
        "/predict", files=[("file", ("b.png", png_header_only(10_000, 10_000), "image/png"))], statuses=(413,)
    ),
    "decompression-bomb-20000x20000": Case(
        "/predict", files=[("file", ("bomb.png", zero_bomb(), "image/png"))], statuses=BOMB
    ),
    "upload-over-size-limit": Case(
        "/predict", files=[("file", ("huge.jpg", b"\xff\xd8" + b"\0" * 2_100_000, "image/jpeg"))], statuses=(413,)
    ),
    "too-many-files": Case("/predict", files=[("file", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(5)]),
    "missing-file-field": Case("/predict", files=[("photo", ("x.jpg", JPEG, "image/jpeg"))]),
    "file-field-is-text": Case("/predict", data={"file": MARKER.decode()}, files=[("x", ("x.jpg", b"1", "a/b"))]),
    "wrong-content-type-json": Case("/predict", content=JPEG, headers=JSON, statuses=(415,)),
    "wrong-content-type-octet": Case(
        "/predict", content=JPEG, headers={"content-type": "application/octet-stream"}, statuses=(415,)
    ),
    "multipart-without-boundary": Case(
        "/predict", content=b"--x\r\n" + MARKER, headers={"content-type": "multipart/form-data"}
    ),
    "multipart-garbage-body": Case(
        "/predict", content=MARKER * 50, headers={"content-type": "multipart/form-data; boundary=zzz"}
    ),
    "multipart-unterminated": Case(
        "/predict",
        content=b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + JPEG[:100],
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    ),
    "body-over-limit-predict": Case(
        "/predict",
        content=b"\0" * 8_100_000,
        headers={"content-type": "multipart/form-data; boundary=zz"},
        statuses=(413,),
    ),
    # /invocations: the MLflow scoring protocol
    "empty-body": invocation(b""),
    "invalid-json": invocation(b'{"inputs": [' + MARKER),
    "top-level-list": invocation(b"[[1, 2, 3]]"),
    "top-level-number": invocation(b"42"),
    "no-known-key": invocation(b'{"data": "' + MARKER + b'"}'),
    "only-params": invocation(b'{"params": {"x": 1}}'),
    "inputs-and-instances": invocation(orjson.dumps({"inputs": seed(), "instances": seed()})),
    "duplicate-inputs-key": invocation(b'{"inputs": [1], "inputs": [2]}'),
    "wrong-rank-scalar": invocation(b'{"inputs": 0.5}'),
    "wrong-rank-3d": invocation(orjson.dumps({"inputs": seed()[0]})),
    "wrong-shape-4-channels": invocation(orjson.dumps({"inputs": np.zeros((1, 224, 224, 4)).tolist()})),
    "wrong-shape-small": invocation(orjson.dumps({"inputs": np.zeros((1, 8, 8, 3)).tolist()})),
    "ragged": invocation(b'{"inputs": [[[[0.1, 0.2, 0.3]], [[0.1]]]]}'),
    "strings": invocation(b'{"inputs": [[[["' + MARKER + b'", "b", "c"]]]]}'),
    "booleans": invocation(b'{"inputs": [[[[true, false, true]]]]}'),
    "objects-in-array": invocation(b'{"instances": [{"b64": "' + MARKER + b'"}]}'),
    "nan-literal": invocation(b'{"inputs": [[[[NaN, 0, 0]]]]}'),
    "infinity-literal": invocation(b'{"inputs": [[[[Infinity, 0, 0]]]]}'),
    "float32-overflow": invocation(b'{"inputs": [[[[1e39, 0, 0]]]]}'),
    "nan-in-fast-path": invocation(big_body_with(b"NaN")),
    "overflow-in-fast-path": invocation(big_body_with(b"1e39")),
    "double-overflow-in-fast-path": invocation(big_body_with(b"1e400")),
    "bare-minus-in-fast-path": invocation(big_body_with(b"-")),
    "string-in-fast-path": invocation(big_body_with(b'"x"')),
    "null-inputs": invocation(b'{"inputs": null}'),
    "null-body": invocation(b"null"),
    "empty-inputs": invocation(b'{"inputs": []}'),
    "nesting-100000-deep": invocation(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "object-nesting-50000-deep": invocation(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    "dataframe-split-wrong-columns": invocation(b'{"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}'),
    "dataframe-split-not-object": invocation(b'{"dataframe_split": [1, 2]}'),
    "dataframe-records-empty": invocation(b'{"dataframe_records": []}'),
    "dataframe-records-mismatched": invocation(b'{"dataframe_records": [{"a": 1}, {"b": 2}]}'),
    "invalid-utf8": invocation(b'{"inputs": "\xff\xfe' + MARKER + b'"}'),
    "utf16-bom": invocation('{"inputs": [1]}'.encode("utf-16")),
    "too-many-instances": invocation(orjson.dumps({"inputs": seed(9)}), statuses=(413,)),
    "body-over-limit": invocation(b'{"inputs": [' + b"0," * 4_100_000 + b"0]}", statuses=(413,)),
    "content-type-text": invocation(b'{"inputs": [1]}', (415,), "text/plain"),
    "content-type-csv": invocation(b"a,b\n1,2", (415,), "text/csv"),
    "content-type-missing": Case("/invocations", content=b'{"inputs": [1]}', statuses=(415,)),
    "charset-latin1": invocation(b'{"inputs": [1]}', (415,), "application/json; charset=latin-1"),
    "charset-utf16": invocation(b'{"inputs": [1]}', (415,), "application/json; charset=utf-16"),
    "content-type-unknown-parameter": invocation(b'{"inputs": [1]}', (415,), "application/json; boundary=x"),
    "content-type-garbage": invocation(b'{"inputs": [1]}', (415,), ";;;=;"),
}


def assert_refused(response: httpx.Response, statuses: tuple[int, ...], payload: bytes) -> None:
    assert response.status_code < 500, response.text[:500]
    assert response.status_code in statuses, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] and body["message"]
    assert len(response.content) < 1_000, "an error answer must be short"
    assert MARKER.decode() not in response.text, "the payload was echoed"
    if len(payload) >= 24:
        assert payload[:24].decode(errors="ignore") not in body["message"]


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
async def test_hostile_request_is_refused_cleanly(client: httpx.AsyncClient, case: Case) -> None:
    if case.files is not None:
        response = await client.post(case.path, files=case.files, data=case.data)
        payload = b"".join(part[1][1] for part in case.files)
    else:
        response = await client.post(case.path, content=case.content, headers=case.headers)
        payload = case.content or b""
    assert_refused(response, case.statuses, payload)
    assert (await client.get("/health/ready")).status_code == 200, "a hostile request broke the service"


def cmyk_jpeg() -> bytes:
    return encoded(photo(mode="CMYK"), "JPEG")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encoded(photo((80, 40)), "JPEG", exif=exif.tobytes())


def png_16bit() -> bytes:
    return encoded(Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)), "PNG")


def palette_with_transparency() -> bytes:
    img = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(img, "PNG", transparency=0)


def float_tiff() -> bytes:
    return encoded(Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), "F"), "TIFF")


def one_frame_gif() -> bytes:
    return encoded(photo().convert("P"), "GIF")


ODD_BUT_VALID: dict[str, bytes] = {
    "cmyk-jpeg": cmyk_jpeg(),
    "grayscale-jpeg": encoded(photo(mode="L"), "JPEG"),
    "grayscale-png": encoded(photo(mode="L"), "PNG"),
    "bilevel-png": encoded(photo(mode="1"), "PNG"),
    "palette-png": encoded(photo(mode="P"), "PNG"),
    "palette-transparent-png": palette_with_transparency(),
    "rgba-png": encoded(photo(mode="RGBA"), "PNG"),
    "la-png": encoded(photo(mode="LA"), "PNG"),
    "16-bit-png": png_16bit(),
    "interlaced-png": encoded(photo(), "PNG", interlace=1),
    "progressive-jpeg": encoded(photo(), "JPEG", progressive=True),
    "webp-lossy": encoded(photo(), "WEBP", quality=80),
    "webp-lossless-rgba": encoded(photo(mode="RGBA"), "WEBP", lossless=True),
    "exif-rotated-jpeg": exif_rotated_jpeg(),
    "bmp": encoded(photo(), "BMP"),
    "tiff": encoded(photo(), "TIFF"),
    "tiff-lzw-cmyk": encoded(photo(mode="CMYK"), "TIFF", compression="tiff_lzw"),
    "float-tiff": float_tiff(),
    "single-frame-gif": one_frame_gif(),
    "smallest-allowed-8x8": encoded(photo((8, 8)), "PNG"),
    "widest-allowed-20-to-1": encoded(photo((400, 20)), "PNG"),
}


@pytest.mark.parametrize("data", list(ODD_BUT_VALID.values()), ids=list(ODD_BUT_VALID))
async def test_odd_but_valid_image_is_classified(client: httpx.AsyncClient, data: bytes) -> None:
    response = await client.post("/predict", files={"file": ("odd", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in ("dandelion", "grass")
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), (i * 80, 200, 0)) for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (32, 32), (i * 80, 200, 0)) for i in range(3)]
    return encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)


DEGENERATE: dict[str, tuple[bytes, str]] = {
    "1x1": (encoded(photo((1, 1)), "PNG"), "each side must be at least"),
    "7x100": (encoded(photo((7, 100)), "PNG"), "each side must be at least"),
    "4000x10": (encoded(photo((4000, 10)), "PNG"), "aspect ratio"),
    "10x4000": (encoded(photo((10, 4000)), "JPEG"), "aspect ratio"),
    "animated-gif": (animated_gif(), "animated"),
    "animated-webp": (animated_webp(), "animated"),
}


@pytest.mark.parametrize(("data", "reason"), list(DEGENERATE.values()), ids=list(DEGENERATE))
async def test_degenerate_image_has_its_documented_refusal(client: httpx.AsyncClient, data: bytes, reason: str) -> None:
    response = await client.post("/predict", files={"file": ("odd.img", data, "image/png")})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_IMAGE"
    assert reason in body["message"]
