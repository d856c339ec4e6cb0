"""The MLflow scoring protocol for this model: request body -> float32 image batch, predictions -> body.

Accepts what ``mlflow models serve`` accepts for a model with a ``(-1, 224, 224, 3)`` tensor signature
(``inputs``, ``instances``, ``dataframe_split``, ``dataframe_records``; optional ``params``), refuses
what it refuses, and never echoes the payload in an error (MLflow does; we do not).

The common request, ``{"inputs": [n x 224 x 224 x 3 numbers]}`` (about 1.7 MB of JSON per image), takes
a fast path: simdjson parses it and flattens the numbers into one buffer in C, and the exact nesting is
checked on the body's bracket skeleton, also in C: ~7x faster than building 150,528 Python floats and
converting them. Anything else, or anything the fast path is unsure of, goes the general way (orjson),
so answers and refusals are the same either way.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
import simdjson

from services.api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, refused_bare
from shared.images import MODEL_SIZE

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
IMAGE_SHAPE = (MODEL_SIZE, MODEL_SIZE, 3)
IMAGE_VALUES = MODEL_SIZE * MODEL_SIZE * 3
REQUIRED = (
    "The request must be a JSON object with exactly one of the keys "
    "'inputs', 'instances', 'dataframe_split' or 'dataframe_records' (and optionally 'params')"
)


def check_content_type(content_type: str | None) -> None:
    """Only ``application/json`` (charset utf-8 if given), as MLflow's server for JSON payloads."""
    if not content_type:
        raise UnsupportedMediaType("Content-Type must be application/json")
    media_type, *parameters = (part.strip() for part in content_type.split(";"))
    if media_type.lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media_type[:100]!r}")
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key.strip().lower() != "charset":
            raise UnsupportedMediaType(f"unsupported Content-Type parameter {key.strip()[:50]!r}")
        if value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("the scoring server only supports UTF-8")


def parse_body(body: bytes, max_instances: int) -> np.ndarray:
    """A JSON body -> float32 ``(n, 224, 224, 3)``; raises :class:`BadRequest` with a short reason.

    A body over 64 KiB never reaches orjson unless its shape is known to hold at most ``max_instances``
    images' worth of values: :func:`screen` counts, types and shapes it on simdjson's document first (in C,
    without a Python object per value) and answers most bodies by itself. A refusal holds nothing of the parse
    (no traceback): everything the parse built is freed before the error leaves.
    """
    return refused_bare(_parse_body, body, max_instances)


def _parse_body(body: bytes, max_instances: int) -> np.ndarray:
    if not body:
        raise BadRequest("the request body is empty")
    if body.startswith(GZIP_MAGIC):
        raise UnsupportedMediaType("the body is gzip-compressed; send it as plain JSON")
    if len(body) > FAST_PATH_MIN_BYTES:
        stripped = body.translate(None, NUMBER_CHARACTERS)  # once: ~0.6 ns a byte, 2 ms for a full-precision image
        if (n := _leading_images(stripped, max_instances)) > max_instances:
            raise _too_many(n, max_instances)
        if (array := fast_tensor(body, max_instances, stripped)) is not None:
            return array
        if (array := screen(body, max_instances)) is not None:
            return array
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {str(exc).split(':')[0]}") from None
    if isinstance(payload, list):
        raise BadRequest(f"{REQUIRED}; received a list")
    if not isinstance(payload, dict):
        raise BadRequest(f"{REQUIRED}; received a JSON {type(payload).__name__}")
    keys = [key for key in FORMATS if key in payload]
    if len(keys) != 1:
        found = ", ".join(repr(k)[:40] for k in list(payload)[:8])
        raise BadRequest(f"{REQUIRED}; received keys: {found or 'none'}")
    key = keys[0]
    value = payload[key]
    if (b"true" in body or b"false" in body) and _holds_a_boolean(value):
        raise BadRequest(f"'{key}' must hold numbers only; true and false are not pixel values")
    if key in ("inputs", "instances"):
        array = _tensor(value, key)
    elif key == "dataframe_split":
        array = _dataframe_split(value)
    else:
        array = _dataframe_records(value)
    if array.shape[0] > max_instances:
        raise _too_many(array.shape[0], max_instances)
    return array


FAST_PATH_MIN_BYTES = 65536
"""Bodies above this are parsed by simdjson first (fast path, then :func:`screen`); smaller ones by orjson."""
REUSED_PARSER_MAX_BYTES = 4 * 1024 * 1024
"""Bodies up to this (one image at full float64 precision is ~3.2 MB) are parsed by a kept parser (:func:`_parsed`)."""
KEPT_PARSERS = 2
"""Parsers kept for reuse: each holds buffers sized for the largest body it parsed (a few times its size)."""
GZIP_MAGIC = b"\x1f\x8b"


def _holds_a_boolean(value: Any) -> bool:
    """Whether a JSON boolean hides among ``value``'s numbers (numpy would read ``true`` as 1.0)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


def screen(body: bytes, max_instances: int) -> np.ndarray | None:
    """A large body that the fast path left: answered here from simdjson's document, or refused, without a Python
    object per value; None only for ``dataframe_records`` of at most ``max_instances`` records of one image's
    width each, left to the general path (which the caller runs a bounded number of at once).

    The probe's bodies: 57 MiB of ``"0.5"`` strings once cost +880 MiB in orjson before the type check; 65
    images were parsed in full before the count (+890 MiB); one 5M-key record took 8 s and +718 MiB.
    """
    try:
        document = simdjson.Parser().parse(body)
    except (ValueError, RuntimeError, TypeError):
        raise BadRequest("the body is not valid JSON (or holds a number beyond 64 bits)") from None
    if isinstance(document, simdjson.Array):
        raise BadRequest(f"{REQUIRED}; received a list")
    if not isinstance(document, simdjson.Object):
        raise BadRequest(f"{REQUIRED}; received a JSON {type(document).__name__}")
    keys = list(document.keys())
    formats = [key for key in keys if key in FORMATS]
    if len(set(formats)) != 1:
        found = ", ".join(repr(k)[:40] for k in keys[:8])
        raise BadRequest(f"{REQUIRED}; received keys: {found or 'none'}")
    key = formats[0]
    if len(formats) > 1:
        raise BadRequest(f"the key '{key}' appears more than once")
    value = document[key]
    if key in ("inputs", "instances"):
        if isinstance(value, simdjson.Object):
            raise BadRequest(f"'{key}' must be a list of images; this model has one unnamed input")
        if not isinstance(value, simdjson.Array):
            raise BadRequest(f"'{key}' must be a list of images")
        numbers = _screened_numbers(value, f"'{key}'", max_instances, IMAGE_SHAPE, _images_expected)
        if not _matches_skeleton(value.mini, _image_skeleton(), len(value)):
            raise _shape_error(value, f"'{key}'", numbers.size, _images_expected)
        return _float32(numbers, f"'{key}'").reshape(-1, *IMAGE_SHAPE)
    if key == "dataframe_split":
        if not isinstance(value, simdjson.Object) or "data" not in value:
            raise BadRequest("'dataframe_split' must be an object with 'columns' and 'data'")
        data = value["data"]
        what = "'dataframe_split.data'"
        if not isinstance(data, simdjson.Array):
            raise BadRequest(f"{what} must be a non-empty array of numbers")
        numbers = _screened_numbers(data, what, max_instances, (IMAGE_VALUES,), _rows_expected)
        if not _matches_skeleton(data.mini, _row_skeleton(), len(data)):
            raise _shape_error(data, what, numbers.size, _rows_expected)
        columns = value.get("columns")
        if columns is not None and (not isinstance(columns, simdjson.Array) or len(columns) != IMAGE_VALUES):
            raise BadRequest("'dataframe_split.columns' does not match the rows")
        return _float32(numbers, what).reshape(-1, *IMAGE_SHAPE)
    records = value
    if not isinstance(records, simdjson.Array) or not len(records) or not isinstance(records[0], simdjson.Object):
        raise BadRequest("'dataframe_records' must be a non-empty list of objects")
    if len(records) > max_instances:
        raise _too_many(len(records), max_instances)
    for record in records:
        if not isinstance(record, simdjson.Object):
            raise BadRequest("'dataframe_records' must be a non-empty list of objects")
        if len(record) != IMAGE_VALUES:
            raise _rows_expected("'dataframe_records'", (len(records), len(record)))
    return None


def _screened_numbers(
    value: simdjson.Array, what: str, max_instances: int, entry: tuple[int, ...], expected
) -> np.ndarray:
    """Every number under ``value``, flattened in C, after its count of entries is checked against the limit
    (413 when its first entry has the ``entry`` shape of one image, else 400 with the shape it has)."""
    n = len(value)
    if n == 0:
        raise BadRequest(f"{what} must be a non-empty array of numbers")
    if n > max_instances:
        if _shape_of(value[0]) == entry:
            raise _too_many(n, max_instances)
        raise expected(what, (n, *_shape_of(value[0])))
    try:
        return np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, RuntimeError, TypeError):
        raise BadRequest(f"{what} must hold numbers only (no strings, booleans, nulls or objects)") from None


def _float32(numbers: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused just below
        array = numbers.astype(np.float32)
    if not np.isfinite(array).all():
        raise BadRequest(f"{what} contains values that are not finite numbers")
    return array


def _shape_of(value: Any) -> tuple[int, ...]:
    """The shape a rectangular array would have, read down the first entries (ragged ones are caught by size)."""
    shape = []
    while isinstance(value, simdjson.Array):
        shape.append(len(value))
        if not len(value):
            break
        value = value[0]
    return tuple(shape)


def _shape_error(value: simdjson.Array, what: str, size: int, expected) -> BadRequest:
    shape = _shape_of(value)
    if int(np.prod(shape)) != size:
        return BadRequest(f"{what} is not a rectangular array of numbers")
    return expected(what, shape)


def _images_expected(what: str, shape: tuple[int, ...]) -> BadRequest:
    return BadRequest(
        f"{what} has shape {shape}; expected (-1, {MODEL_SIZE}, {MODEL_SIZE}, 3): "
        f"a list of {MODEL_SIZE}x{MODEL_SIZE} RGB images with values in [0, 1]"
    )


def _rows_expected(what: str, shape: tuple[int, ...]) -> BadRequest:
    return BadRequest(
        f"{what} has shape {shape}; each row must be one flattened {MODEL_SIZE}x{MODEL_SIZE}x3 "
        f"image ({IMAGE_VALUES} columns)"
    )


def _too_many(n: int, max_instances: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"at most {max_instances} images per request; received {n}")


NUMBER_CHARACTERS = b"0123456789.eE+- \t\r\n"
"""Deleted from a body to leave its skeleton: brackets, commas, braces, keys (and anything that is no number)."""


@lru_cache(maxsize=1)
def _image_skeleton() -> bytes:
    """One 224 x 224 x 3 image once its numbers are deleted (~250 KB, built once: its size is the model's,
    never the request's)."""
    row = b"[" + b",".join([b"[,,]"] * MODEL_SIZE) + b"]"
    return b"[" + b",".join([row] * MODEL_SIZE) + b"]"


@lru_cache(maxsize=1)
def _row_skeleton() -> bytes:
    """One flattened image (a data frame's row) once its numbers are deleted."""
    return b"[" + b"," * (IMAGE_VALUES - 1) + b"]"


def _has_image_skeleton(stripped: bytes, key: str, n: int) -> bool:
    """Whether ``stripped`` (a body without its numbers) starts ``{"key":[image,image,...]`` with ``n`` images,
    checked in place, image by image: nothing the size of ``n`` is ever built."""
    opening = f'{{"{key}":'.encode().translate(None, NUMBER_CHARACTERS)
    return stripped.startswith(opening) and _list_of(stripped, len(opening), _image_skeleton(), n)


def _leading_images(stripped: bytes, max_instances: int) -> int:
    """How many image-shaped entries open the list of a body that starts ``{"inputs":[`` or ``{"instances":[``,
    counted on its skeleton, in place (0 for any other body): more than ``max_instances`` is refused before any
    parse builds a document (65 images once cost +890 MiB in orjson, +370 MiB in simdjson)."""
    image = _image_skeleton()
    for key in ("inputs", "instances"):
        opening = f'{{"{key}":['.encode()
        if stripped.startswith(opening):
            position, n = len(opening), 0
            while stripped.startswith(image, position):
                n += 1
                position += len(image)
                if not stripped.startswith(b",", position):
                    break
                position += 1
            return n
    return 0


def _matches_skeleton(minified: bytes, item: bytes, n: int) -> bool:
    """Whether ``minified`` (one JSON list) is exactly ``n`` copies of ``item`` once its numbers are deleted."""
    stripped = minified.translate(None, NUMBER_CHARACTERS)
    return len(stripped) == n * (len(item) + 1) + 1 and _list_of(stripped, 0, item, n)


def _list_of(stripped: bytes, position: int, item: bytes, n: int) -> bool:
    if not stripped.startswith(b"[", position):
        return False
    position += 1
    for i in range(n):
        if not stripped.startswith(item, position):
            return False
        position += len(item)
        if not stripped.startswith(b"," if i < n - 1 else b"]", position):
            return False
        position += 1
    return True


_kept_parsers: queue.Queue[simdjson.Parser] = queue.Queue(maxsize=KEPT_PARSERS)


def _parsed(body: bytes, read: Callable[[Any], np.ndarray | None]) -> np.ndarray | None:
    """``read(document)`` of ``body`` parsed by simdjson, None if it is not JSON simdjson will hold. Bodies up to
    :data:`REUSED_PARSER_MAX_BYTES` take one of :data:`KEPT_PARSERS` kept parsers: a fresh parser's buffers are
    new pages every time (with the API's 1 MiB mmap threshold, ~2 ms of page faults for a 1 MB body); ``read``
    must return no simdjson object (a parser is reused only once its document is gone)."""
    kept = len(body) <= REUSED_PARSER_MAX_BYTES
    parser = None
    if kept:
        with contextlib.suppress(queue.Empty):
            parser = _kept_parsers.get_nowait()
    parser = parser or simdjson.Parser()
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError, TypeError):
        return None  # invalid JSON, or a number simdjson will not hold
    result = read(document)  # if it raises, the parser goes with the traceback that may hold its objects
    del document
    if kept:
        with contextlib.suppress(queue.Full):  # never more than KEPT_PARSERS, however many threads parse
            _kept_parsers.put_nowait(parser)
    return result


def fast_tensor(body: bytes, max_instances: int, stripped: bytes | None = None) -> np.ndarray | None:
    """``{"inputs"|"instances": n x 224 x 224 x 3 numbers, ...}`` as float32, or None to take the general path.

    Returns an array only when the general path would return the same one: valid JSON (simdjson validates
    as strictly as orjson), the tensor key first and alone among the formats, no duplicate keys, exactly
    the nesting of n images with a number in every place (checked on the skeleton: what is left once
    digits, signs, points, exponents and whitespace are deleted), numbers that fit a float32 and whose
    rounding cannot depend on the path (integers of at most 2**53). A list of more than ``max_instances``
    entries is left to the general path at once, before anything is sized by their number. ``stripped`` is
    ``body`` without :data:`NUMBER_CHARACTERS`, if the caller has it.
    """
    if stripped is None:
        stripped = body.translate(None, NUMBER_CHARACTERS)
    return _parsed(body, lambda document: _tensor_of(document, max_instances, stripped))


def _tensor_of(document: Any, max_instances: int, stripped: bytes) -> np.ndarray | None:
    if not isinstance(document, simdjson.Object):
        return None
    keys = list(document.keys())
    formats = [key for key in keys if key in FORMATS]
    if len(formats) != 1 or formats[0] not in ("inputs", "instances") or len(set(keys)) != len(keys):
        return None
    key = formats[0]
    value = document[key]
    if not isinstance(value, simdjson.Array) or len(value) == 0:
        return None
    n = len(value)
    if n > max_instances:
        return None  # not n images, or too many: either way nothing is sized by n here; the general path says which
    if not _has_image_skeleton(stripped, key, n):
        return None
    try:
        numbers = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, RuntimeError, TypeError):
        return None
    # min and max, not abs: no array-sized temporary; a NaN fails both comparisons, and every float64 within
    # 2**53 is finite as float32
    if numbers.size != n * IMAGE_VALUES or not (numbers.min() >= -(2.0**53) and numbers.max() <= 2.0**53):
        return None
    return numbers.astype(np.float32).reshape(n, *IMAGE_SHAPE)


def _numeric(value: Any, what: str) -> np.ndarray:
    if value is None:
        raise BadRequest(f"{what} is null")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise BadRequest(f"{what} is not a rectangular array of numbers") from None
    if array.dtype.kind not in "fiu" or array.size == 0:
        raise BadRequest(f"{what} must be a non-empty array of numbers")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused just below
        array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise BadRequest(f"{what} contains values that are not finite numbers")
    return array


def _as_images(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1:] == IMAGE_SHAPE:
        return np.ascontiguousarray(array)
    raise BadRequest(
        f"{what} has shape {tuple(array.shape)}; expected (-1, {MODEL_SIZE}, {MODEL_SIZE}, 3): "
        f"a list of {MODEL_SIZE}x{MODEL_SIZE} RGB images with values in [0, 1]"
    )


def _tensor(value: Any, key: str) -> np.ndarray:
    if isinstance(value, dict):
        raise BadRequest(f"'{key}' must be a list of images; this model has one unnamed input")
    if not isinstance(value, list):
        raise BadRequest(f"'{key}' must be a list of images")
    return _as_images(_numeric(value, f"'{key}'"), f"'{key}'")


def _frame_rows(rows: np.ndarray, what: str) -> np.ndarray:
    """As MLflow reshapes a data frame for a single unnamed tensor input: one flattened image per row.

    (``mlflow models serve`` computes the same answer, but parsing a 150,528-column frame with pandas
    takes it longer than its 60 s request timeout; a one-column frame of nested images it refuses.)
    """
    if rows.ndim == 2 and rows.shape[1] == IMAGE_VALUES:
        return rows.reshape(-1, *IMAGE_SHAPE)
    raise BadRequest(
        f"{what} has shape {tuple(rows.shape)}; each row must be one flattened {MODEL_SIZE}x{MODEL_SIZE}x3 "
        f"image ({IMAGE_VALUES} columns)"
    )


def _dataframe_split(value: Any) -> np.ndarray:
    if not isinstance(value, dict) or "data" not in value:
        raise BadRequest("'dataframe_split' must be an object with 'columns' and 'data'")
    columns = value.get("columns")
    rows = _numeric(value["data"], "'dataframe_split.data'")
    if columns is not None and (not isinstance(columns, list) or (rows.ndim >= 2 and len(columns) != rows.shape[1])):
        raise BadRequest("'dataframe_split.columns' does not match the rows")
    return _frame_rows(rows, "'dataframe_split.data'")


def _dataframe_records(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
        raise BadRequest("'dataframe_records' must be a non-empty list of objects")
    columns = list(value[0])
    if any(list(r) != columns for r in value[1:]):
        raise BadRequest("every record of 'dataframe_records' must have the same keys")
    rows = _numeric([[r[c] for c in columns] for r in value], "'dataframe_records'")
    return _frame_rows(rows, "'dataframe_records'")


def predictions_body(probabilities: np.ndarray) -> bytes:
    """``{"predictions": [[p_dandelion, p_grass], ...]}`` as MLflow writes a float32 array."""
    return orjson.dumps({"predictions": probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)
