"""The fast path for large ``/invocations`` bodies answers and refuses exactly as the general path does."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import orjson
import pytest

from services.api import protocol
from services.api.errors import ApiError

RNG = np.random.default_rng(11)
IMAGES = RNG.random((2, 224, 224, 3), dtype=np.float32)


def numpy_json(payload: dict) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def spaced_json(payload: dict) -> bytes:
    """As ``requests``/``json.dumps`` write it: spaces after commas and colons, float64 reprs."""
    return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in payload.items()}).encode()


def tampered(body: bytes, old: bytes, new: bytes, nth: int = 1) -> bytes:
    """``body`` with its ``nth`` occurrence of ``old`` replaced by ``new``."""
    at = -1
    for _ in range(nth):
        at = body.index(old, at + 1)
    return body[:at] + new + body[at + len(old) :]


def first_number(body: bytes, token: bytes) -> bytes:
    """``body`` with its first number replaced by ``token``."""
    start = body.index(b"[[[[") + 4
    return body[:start] + token + body[body.index(b",", start) :]


ONE = numpy_json({"inputs": IMAGES[:1]})
INTEGERS = numpy_json({"inputs": (IMAGES[:1] * 255).round().astype(np.int64)})
ACCEPTED = {
    "orjson numpy": ONE,
    "two images": numpy_json({"inputs": IMAGES}),
    "instances": numpy_json({"instances": IMAGES[:1]}),
    "params after": numpy_json({"inputs": IMAGES[:1], "params": {"threshold": [1, 2]}}),
    "params first": numpy_json({"params": {"a": 1}, "inputs": IMAGES[:1]}),
    "json.dumps spaces": spaced_json({"inputs": IMAGES[:1]}),
    "pretty": json.dumps({"inputs": IMAGES[:1].tolist()}, indent=1).encode(),
    "integers": INTEGERS,
    "mixed integers": first_number(ONE, b"1"),
    "exponent": first_number(ONE, b"-2.5E-3"),
    "large but finite": first_number(ONE, b"1e30"),
    "extra key": numpy_json({"inputs": IMAGES[:1], "other": "x"}),
}
TRICKY = {
    "ragged pixel": tampered(ONE, b"],[", b",1],[", 5),
    "short pixel": tampered(ONE, b",", b"],[", 7),
    "a boolean": first_number(ONE, b"true"),
    "a null": first_number(ONE, b"null"),
    "a string": first_number(ONE, b'"0.5"'),
    "a nested list": first_number(ONE, b"[0.5]"),
    "empty slot": first_number(ONE, b""),
    "leading zero": first_number(ONE, b"01"),
    "leading plus": first_number(ONE, b"+1"),
    "too large for float32": first_number(ONE, b"1e39"),
    "too large for float64": first_number(ONE, b"1e400"),
    "huge integer": first_number(ONE, b"99999999999999999999999"),
    "uint64 integer": first_number(ONE, b"18446744073709551615"),
    "NaN": first_number(ONE, b"NaN"),
    "trailing garbage": ONE + b"x",
    "two formats": numpy_json({"inputs": IMAGES[:1], "instances": IMAGES[:1]}),
    "duplicate key": ONE[:-1] + b',"inputs":[1]}',
    "a list at the top": numpy_json([IMAGES[:1]]),
    "empty inputs": b'{"inputs": []' + b" " * 70000 + b"}",
    "too many images": numpy_json({"inputs": np.repeat(IMAGES[:1], 9, axis=0)}),
    "wrong size": numpy_json({"inputs": IMAGES[:1, :223]}),
    "invalid utf-8": ONE.replace(b'{"inputs"', b'{"inputs","\xff":0,"x"', 1),
}


def general(body: bytes, monkeypatch: pytest.MonkeyPatch) -> np.ndarray | tuple[type, str]:
    with monkeypatch.context() as patched:
        patched.setattr(protocol, "fast_tensor", lambda *args: None)
        return outcome(body)


def outcome(body: bytes) -> np.ndarray | tuple[type, str]:
    try:
        return protocol.parse_body(body, max_instances=8)
    except ApiError as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_bodies_take_the_fast_path_and_give_the_same_array(name: str, monkeypatch) -> None:
    body = ACCEPTED[name]
    assert len(body) > 65536
    expected = general(body, monkeypatch)
    assert isinstance(expected, np.ndarray), expected
    fast = protocol.fast_tensor(body, 64)
    if name not in ("params first", "large but finite"):  # those are correct, but the general path's
        assert fast is not None, "the fast path gave up on a common body"
    got = protocol.parse_body(body, max_instances=8)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", TRICKY)
def test_odd_bodies_get_the_general_paths_answer(name: str, monkeypatch) -> None:
    """Refused as before, with the same reason; or (booleans, huge integers) accepted as before."""
    body = TRICKY[name]
    expected, got = general(body, monkeypatch), outcome(body)
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected)
    else:
        assert got == expected


def test_the_fast_path_is_exact_for_float32_values() -> None:
    np.testing.assert_array_equal(protocol.fast_tensor(numpy_json({"inputs": IMAGES}), 64), IMAGES)


def test_kept_parsers_answer_as_fresh_ones_and_stay_bounded() -> None:
    """Parsers are reused across bodies and threads (up to KEPT_PARSERS of them), each answer its own body's;
    a reader that fails takes its parser with it, and the next body is still answered."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [numpy_json({"inputs": IMAGES[i : i + 1]}) for i in range(2)] + [spaced_json({"inputs": IMAGES})]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: protocol.fast_tensor(bodies[i % 3], 64), range(24)))
    for i, array in enumerate(got):
        np.testing.assert_array_equal(array, IMAGES[i % 3 : i % 3 + 1] if i % 3 < 2 else IMAGES)
    assert 1 <= protocol._kept_parsers.qsize() <= protocol.KEPT_PARSERS

    def failing(document):
        held = document  # noqa: F841 - a simdjson object in the failing frame
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        protocol._parsed(bodies[0], failing)
    np.testing.assert_array_equal(protocol.fast_tensor(bodies[1], 64), IMAGES[1:2])


def _flat_zeros(n: int, padding: int = 70_000) -> bytes:
    """``{"inputs":[0,0,...]}`` padded with spaces past the fast path's threshold (the probe's request)."""
    return b'{"inputs":[' + b",".join([b"0"] * n) + b"]" + b" " * padding + b"}"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (_flat_zeros(200), 400),  # the probe's request: once +49 MB, kept in a cache
        (_flat_zeros(8), 400),  # few enough entries: the skeleton check fails in place
        (_flat_zeros(33_000, padding=0), 400),  # 66 KB that once asked for ~8 GB
        (_flat_zeros(1_000_000, padding=0), 400),  # once a 500 MemoryError
    ],
)
def test_no_request_sized_allocation_before_the_limits(body: bytes, status: int) -> None:
    """Memory used while refusing a body stays a small multiple of the body: nothing is sized by the number of
    entries it claims, and nothing request-sized is cached (hostile-probe finding #1)."""
    import tracemalloc

    protocol._image_skeleton()  # the one fixed-size skeleton, the model's size, built once per process
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            protocol.parse_body(body, max_instances=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status_code == status, str(refused.value)
    assert peak < 16 * len(body) + 1_000_000, f"{peak / 1e6:.1f} MB allocated for a {len(body) / 1e3:.0f} KB body"
    assert protocol._image_skeleton.cache_info().currsize == 1


# Every refusal, word for word, on both paths: a small body (orjson) and the same JSON padded past
# FAST_PATH_MIN_BYTES (simdjson, screened). A client reads the message to fix its request; the two paths may word
# a refusal differently, but each says what is wrong with this body.
PAD = b" " * (protocol.FAST_PATH_MIN_BYTES + 100)
SAME = object()
IMAGE_JSON = [[[0.5, 0.5, 0.5]] * 224] * 224
ROW = [0.5] * protocol.IMAGE_VALUES
REQ = protocol.REQUIRED
SHAPE = "; expected (-1, 224, 224, 3): a list of 224x224 RGB images with values in [0, 1]"
ROWS = "; each row must be one flattened 224x224x3 image (150528 columns)"
NOT_NUMBERS = "must hold numbers only (no strings, booleans, nulls or objects)"
INVALID = (400, "the body is not valid JSON (or holds a number beyond 64 bits)")
TOO_MANY = (413, "at most 8 images per request; received 9")
RECORDS, DATA = "'dataframe_records'", "'dataframe_split.data'"
OBJECTS, NON_EMPTY = "must be a non-empty list of objects", "must be a non-empty array of numbers"
SPLIT_OBJECT = "'dataframe_split' must be an object with 'columns' and 'data'"
REFUSALS = {
    "empty": (b"", (400, "the request body is empty"), INVALID),
    "not json": (b'{"inputs": [1,', (400, "the body is not valid JSON: unexpected end of data"),
                 INVALID),
    "a list": (b"[1, 2]", (400, f"{REQ}; received a list"), SAME),
    "a number": (b"3", (400, f"{REQ}; received a JSON int"), SAME),
    "a string": (b'"x"', (400, f"{REQ}; received a JSON str"), SAME),
    "no key": (b"{}", (400, f"{REQ}; received keys: none"), SAME),
    "other keys": (b'{"a": 1, "b": 2}', (400, f"{REQ}; received keys: 'a', 'b'"), SAME),
    "gzip": (b"\x1f\x8b\x08\x00", (415, "the body is gzip-compressed; send it as plain JSON"), SAME),
    "nine long keys": (json.dumps({f"{i}{'k' * 50}": 0 for i in range(9)}).encode(),
                       (400, f"{REQ}; received keys: " + ", ".join(repr(f"{i}{'k' * 50}")[:40] for i in range(8))),
                       SAME),
    "two formats": (b'{"inputs": [1], "instances": [1]}', (400, f"{REQ}; received keys: 'inputs', 'instances'"), SAME),
    "inputs object": (b'{"inputs": {"a": 1}}',
                      (400, "'inputs' must be a list of images; this model has one unnamed input"), SAME),
    "inputs number": (b'{"inputs": 1}', (400, "'inputs' must be a list of images"), SAME),
    "instances null": (b'{"instances": null}', (400, "'instances' must be a list of images"), SAME),
    "inputs empty": (b'{"inputs": []}', (400, f"'inputs' {NON_EMPTY}"), SAME),
    "ragged": (b'{"inputs": [[1, 2], [3]]}', (400, "'inputs' is not a rectangular array of numbers"), SAME),
    "a null inside": (b'{"inputs": [null]}', (400, f"'inputs' {NON_EMPTY}"),
                      (400, f"'inputs' {NOT_NUMBERS}")),
    "a string inside": (b'{"inputs": [["0.5"]]}', (400, f"'inputs' {NON_EMPTY}"),
                        (400, f"'inputs' {NOT_NUMBERS}")),
    "a boolean": (b'{"inputs": [[[[true, 0.5, 0.5]]]]}',
                  (400, "'inputs' must hold numbers only; true and false are not pixel values"),
                  (400, f"'inputs' {NOT_NUMBERS}")),
    "not finite": (b'{"instances": [[1e39]]}', (400, "'instances' contains values that are not finite numbers"),
                   (400, f"'instances' has shape (1, 1){SHAPE}")),
    "not finite image": (json.dumps({"inputs": [[[[1e39, 0.5, 0.5]] + [[0.5] * 3] * 223] * 224]}).encode(),
                         (400, "'inputs' contains values that are not finite numbers"), SAME),
    "wrong shape": (b'{"inputs": [[0.5, 0.5]]}', (400, f"'inputs' has shape (1, 2){SHAPE}"), SAME),
    "image rows": (b'{"inputs": [[[0.5, 0.5, 0.5]]]}', (400, f"'inputs' has shape (1, 1, 3){SHAPE}"), SAME),
    "a false": (b'{"inputs": [[[[false, 0.5, 0.5]]]]}',
                (400, "'inputs' must hold numbers only; true and false are not pixel values"),
                (400, f"'inputs' {NOT_NUMBERS}")),
    "a boolean in an object": (b'{"inputs": [{"a": true}]}',
                               (400, "'inputs' must hold numbers only; true and false are not pixel values"),
                               (400, f"'inputs' {NOT_NUMBERS}")),
    "true, but not a boolean": (b'{"inputs": [[0.5]], "params": {"mode": "true"}}',
                                (400, f"'inputs' has shape (1, 1){SHAPE}"), SAME),
    "split data null": (b'{"dataframe_split": {"data": null}}', (400, f"{DATA} is null"),
                        (400, f"{DATA} must be a non-empty array of numbers")),
    "split short columns": (b'{"dataframe_split": {"columns": ["a"], "data": [[0.5, 0.5]]}}',
                            (400, "'dataframe_split.columns' does not match the rows"),
                            (400, f"{DATA} has shape (1, 2){ROWS}")),
    "a tiny image": (b'{"inputs": [[[[0.5, 0.5, 0.5]]]]}', (400, f"'inputs' has shape (1, 1, 1, 3){SHAPE}"), SAME),
    "five dimensions": (b'{"inputs": [[[[[0.5]]]]]}', (400, f"'inputs' has shape (1, 1, 1, 1, 1){SHAPE}"), SAME),
    "an empty row": (b'{"inputs": [[[]]]}', (400, f"'inputs' {NON_EMPTY}"),
                     (400, f"'inputs' has shape (1, 1, 0){SHAPE}")),
    "nine images": (json.dumps({"inputs": [IMAGE_JSON] * 9}).encode(), TOO_MANY, SAME),
    "nine numbers": (b'{"inputs": [1, 2, 3, 4, 5, 6, 7, 8, 9]}', (400, f"'inputs' has shape (9,){SHAPE}"), SAME),
    "nine rows of two": (b'{"inputs": [[1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2]]}',
                         (400, f"'inputs' has shape (9, 2){SHAPE}"), SAME),
    "split not object": (b'{"dataframe_split": [1]}', (400, SPLIT_OBJECT), SAME),
    "split no data": (b'{"dataframe_split": {"columns": ["a"]}}',
                      (400, SPLIT_OBJECT), SAME),
    "split data number": (b'{"dataframe_split": {"data": 1}}', (400, f"{DATA} has shape (){ROWS}"),
                          (400, f"{DATA} {NON_EMPTY}")),
    "split narrow rows": (b'{"dataframe_split": {"data": [[0.5, 0.5, 0.5]]}}',
                          (400, f"{DATA} has shape (1, 3){ROWS}"), SAME),
    "split columns": (json.dumps({"dataframe_split": {"columns": ["a"], "data": [ROW]}}).encode(),
                      (400, "'dataframe_split.columns' does not match the rows"), SAME),
    "split columns not list": (json.dumps({"dataframe_split": {"columns": "a", "data": [ROW]}}).encode(),
                               (400, "'dataframe_split.columns' does not match the rows"), SAME),
    "split ragged": (b'{"dataframe_split": {"data": [[0.5, 0.5], [0.5]]}}',
                     (400, f"{DATA} is not a rectangular array of numbers"), SAME),
    "split nine rows": (json.dumps({"dataframe_split": {"data": [ROW] * 9}}).encode(), TOO_MANY, SAME),
    "split nine narrow rows": (json.dumps({"dataframe_split": {"data": [[0.5]] * 9}}).encode(),
                               (400, f"{DATA} has shape (9, 1){ROWS}"), SAME),
    "records empty": (b'{"dataframe_records": []}', (400, f"{RECORDS} {OBJECTS}"), SAME),
    "records numbers": (b'{"dataframe_records": [1]}', (400, f"{RECORDS} {OBJECTS}"), SAME),
    "records mixed": (b'{"dataframe_records": [{"a": 1}, 2]}', (400, f"{RECORDS} {OBJECTS}"),
                      (400, f"{RECORDS} has shape (2, 1){ROWS}")),
    "records keys": (b'{"dataframe_records": [{"a": 1}, {"a": 1}, {"b": 2}]}',
                     (400, f"every record of {RECORDS} must have the same keys"),
                     (400, f"{RECORDS} has shape (3, 1){ROWS}")),
    "records narrow": (b'{"dataframe_records": [{"a": 0.5}]}', (400, f"{RECORDS} has shape (1, 1){ROWS}"), SAME),
    "records null": (b'{"dataframe_records": [{"a": null}]}', (400, f"{RECORDS} {NON_EMPTY}"),
                     (400, f"{RECORDS} has shape (1, 1){ROWS}")),
    "records nine": (json.dumps({"dataframe_records": [{"a": 1}] * 9}).encode(),
                     (400, f"{RECORDS} has shape (9, 1){ROWS}"), TOO_MANY),
    "duplicate inputs": (b'{"inputs": [1], "inputs": [[0.5]]}', (400, f"'inputs' has shape (1, 1){SHAPE}"),
                         (400, "the key 'inputs' appears more than once")),
}  # fmt: skip


def padded(body: bytes) -> bytes:
    """The same JSON, over the fast-path size (whitespace before its last character)."""
    return body[:-1] + PAD + body[-1:] if body[:1] in (b"{", b"[") else body + PAD


@pytest.mark.parametrize("name", REFUSALS)
def test_each_refusal_says_what_is_wrong_on_either_path(name: str) -> None:
    body, small, large = REFUSALS[name]
    for sent, expected in ((body, small), (padded(body), small if large is SAME else large)):
        with pytest.raises(ApiError) as refused:
            protocol.parse_body(sent, max_instances=8)
        assert (refused.value.status_code, str(refused.value)) == expected, len(sent)


def held_by(error: BaseException) -> list[object]:
    """The locals of every frame of the API's code that ``error`` keeps alive: its traceback's, and those of the
    errors it replaced."""
    held = []
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals["__name__"].startswith("services."):
                held.extend(tb.tb_frame.f_locals.values())
            tb = tb.tb_next
        error = error.__context__ or error.__cause__
    return held


def strings(n: int) -> bytes:
    """``n`` images of ``"0.5"`` strings: valid JSON of the right shape, refused only by its type (the probe's)."""
    return orjson.dumps({"inputs": np.full((n, 224, 224, 3), "0.5").tolist()})


@pytest.mark.parametrize("name", [*REFUSALS, "strings"])
def test_a_refusal_holds_nothing_of_the_parse(name: str) -> None:
    """The error a refused body raises keeps no frame of the parse alive: a 57 MiB body's simdjson document
    and stripped copy (+378 MiB) once lived as long as the error, past the parse turn, piling up under load."""
    body = strings(2) if name == "strings" else REFUSALS[name][0]
    for sent in (body, padded(body)):
        with pytest.raises(ApiError) as refused:
            protocol.parse_body(sent, max_instances=8)
        error = refused.value
        assert error.__context__ is None and error.__cause__ is None, name
        kept = [v for v in held_by(error) if v is not sent and v is not error and not isinstance(v, int | Callable)]
        assert kept in ([], [(sent, 8), {}]), (name, [type(v).__name__ for v in kept])


def test_dataframes_of_one_image_a_row_are_those_images() -> None:
    rows = IMAGES.reshape(2, -1)
    split = numpy_json({"dataframe_split": {"columns": [str(i) for i in range(rows.shape[1])], "data": rows}})
    records = orjson.dumps({"dataframe_records": [{str(i): float(v) for i, v in enumerate(row)} for row in rows]})
    for body in (split, numpy_json({"dataframe_split": {"data": rows}}), records):
        array = protocol.parse_body(body, max_instances=8)
        assert array.dtype == np.float32 and array.flags.c_contiguous
        np.testing.assert_array_equal(array, IMAGES)
    small = protocol.parse_body(b'{"inputs": ' + json.dumps([IMAGE_JSON]).encode() + b"}", max_instances=1)
    assert small.shape == (1, 224, 224, 3) and small.dtype == np.float32 and small.flags.c_contiguous


@pytest.mark.parametrize(
    ("content_type", "refusal"),
    [
        ("application/json", None),
        ("Application/JSON", None),
        ("application/json; charset=utf-8", None),
        ('application/json;charset="UTF8"', None),
        (None, "Content-Type must be application/json"),
        ("", "Content-Type must be application/json"),
        ("text/plain", "Content-Type must be application/json, not 'text/plain'"),
        ("application/json; boundary=x", "unsupported Content-Type parameter 'boundary'"),
        ("application/json; charset=latin-1", "the scoring server only supports UTF-8"),
        ("x" * 300, f"Content-Type must be application/json, not {'x' * 100!r}"),
    ],
)
def test_content_type(content_type: str | None, refusal: str | None) -> None:
    if refusal is None:
        protocol.check_content_type(content_type)
        return
    with pytest.raises(ApiError) as refused:
        protocol.check_content_type(content_type)
    assert (refused.value.status_code, str(refused.value)) == (415, refusal)


def test_exactly_max_instances_are_accepted_on_every_path() -> None:
    """At the limit, not over it: the fast path, the screened one (an integer beyond 2**53 leaves the fast path)
    and the general one (records)."""
    two = numpy_json({"inputs": IMAGES})
    assert protocol.parse_body(two, max_instances=2).shape == (2, 224, 224, 3)
    screened = first_number(two, b"100000000000000000")
    assert protocol.fast_tensor(screened, 2) is None
    assert protocol.parse_body(screened, max_instances=2).shape == (2, 224, 224, 3)
    records = orjson.dumps({"dataframe_records": [{str(i): 0.5 for i in range(protocol.IMAGE_VALUES)}] * 2})
    assert protocol.parse_body(records, max_instances=2).shape == (2, 224, 224, 3)
    with pytest.raises(ApiError, match=r"^at most 1 images per request; received 2$"):
        protocol.parse_body(records, max_instances=1)
