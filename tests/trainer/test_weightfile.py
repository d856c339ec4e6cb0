"""The legacy torch weight reader: round trips, strided views, refusals (hostile globals, checksums, corruption)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from services.trainer import backbone
from services.trainer.weightfile import WeightFileError, parse, read_state_dict
from tests.trainer.legacy_pickle import hostile_item, legacy_file


def _write(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.random(8).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.standard_normal((5, 8)).astype(np.float32),
    }


def test_round_trip_of_a_crafted_file(tmp_path: Path) -> None:
    tensors = _tensors()
    path, digest = _write(tmp_path, legacy_file(tensors))
    loaded = read_state_dict(path, digest)
    assert list(loaded) == list(tensors)  # file order kept
    for name, expected in tensors.items():
        assert loaded[name].dtype == expected.dtype and loaded[name].flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(loaded[name], expected)


def test_strided_views_are_honoured(tmp_path: Path) -> None:
    """Weights converted from TensorFlow are views of storages in (h, w, in, out) order, as the real files."""
    tensors = _tensors()
    path, digest = _write(tmp_path, legacy_file(tensors, transposed=frozenset({"conv.weight", "fc.weight"})))
    loaded = read_state_dict(path, digest)
    np.testing.assert_array_equal(loaded["conv.weight"], tensors["conv.weight"])
    np.testing.assert_array_equal(loaded["fc.weight"], tensors["fc.weight"])


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("builtins", "eval"), ("subprocess", "check_output"), ("torch", "load"), ("numpy", "load")],
)
def test_a_hostile_pickle_is_refused_without_running_it(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    argument = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    data = legacy_file(_tensors(), extra_object=hostile_item(module, name, argument))
    path, digest = _write(tmp_path, data)  # even with the right checksum, the reader refuses the global
    with pytest.raises(WeightFileError, match=f"refused: the weight file names {module}.{name}"):
        read_state_dict(path, digest)
    assert not marker.exists()


def test_the_checksum_is_checked_before_anything_is_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = legacy_file(_tensors(), extra_object=hostile_item("os", "system", f"touch {marker}"))
    path, _ = _write(tmp_path, data)
    with pytest.raises(WeightFileError, match=r"expected 0{64}: refusing to read it"):
        read_state_dict(path, "0" * 64)
    good, digest = _write(tmp_path, legacy_file(_tensors()))
    good.write_bytes(good.read_bytes()[:-1] + b"\x00")  # one byte changed after the checksum was pinned
    with pytest.raises(WeightFileError, match="refusing to read it"):
        read_state_dict(good, digest)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\x00", "unexpected bytes after the last storage"),
        (lambda b: b"\x80\x02K\x01." + b[b.index(b".") + 1 :], "wrong magic number"),
        (lambda b: b"not a pickle at all", "not a legacy torch weight file"),
        (lambda b: b"", "not a legacy torch weight file"),
    ],
)
def test_corrupt_files_are_refused(mutate, reason: str) -> None:
    with pytest.raises(WeightFileError, match=reason):
        parse(mutate(legacy_file(_tensors())))


def test_a_view_past_its_storage_is_refused() -> None:
    data = legacy_file({"w": np.zeros((2, 3), np.float32)})
    # Claim a larger shape than the storage holds: (2, 3) -> (2, 9) in the pickled size tuple.
    tampered = data.replace(b"K\x02K\x03\x86", b"K\x02K\x09\x86", 1)
    assert tampered != data
    with pytest.raises(WeightFileError, match="reaches past the end of its storage"):
        parse(tampered)


def test_the_packaged_lite0_weights() -> None:
    """The real file of the trainer's dependency: its pinned checksum, 296 tensors, 4,694,024 float32 values."""
    variant = backbone.VARIANTS["lite0"]
    weights = backbone.load_weights(variant)
    assert len(weights) == 296
    assert sum(v.size for v in weights.values() if v.dtype == np.float32) == 4_694_024
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert all(v.flags["C_CONTIGUOUS"] for v in weights.values())
