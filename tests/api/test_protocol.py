"""The fast path for large ``/invocations`` bodies answers and refuses exactly as the general path does."""

from __future__ import annotations

import json

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
