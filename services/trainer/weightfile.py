"""Reads a PyTorch weight file in torch's legacy format into NumPy arrays, without torch and without running code.

A ``.pth`` file is a pickle, and unpickling can call anything. This reader accepts only what a legacy
state dict is made of and refuses the rest before it is touched:

* the file's sha256 must equal the pinned one (checked before a byte is unpickled);
* the pickles may name only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the
  storage classes in :data:`STORAGE_DTYPES`; any other global (``os.system``, ``builtins.eval``, …) is
  an error, so the unpickler never imports or calls it;
* a tensor is a view described by offset, shape and strides into a storage whose raw little-endian bytes
  follow the pickles; every view is checked to lie inside its storage.

The legacy layout (``torch.save(..., _use_new_zipfile_serialization=False)``): five pickles, namely the
magic number, the protocol version (1001), a system-info dict, the object (tensors refer to storages by
a persistent id ``("storage", type, key, location, numel, view_metadata)``) and the list of storage keys,
then, for each key in that order, an 8-byte little-endian element count and the storage's data.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}
"""The storage classes a weight file may use, and how their bytes are laid out on disk."""
MAX_FILE_BYTES = 512 * 1024 * 1024


class WeightFileError(ValueError):
    """The file is not a legacy torch state dict that this reader trusts."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records the view, builds nothing yet."""
    if not isinstance(storage, _StorageRef):
        raise WeightFileError("a tensor refers to something other than a storage")
    values = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) or len(size) != len(stride):
        raise WeightFileError("a tensor has a malformed offset, shape or stride")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names a legacy state dict needs; anything else is refused."""

    def __init__(self, file, storages: dict[str, _StorageRef] | None) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if self._storages is not None:  # only the object pickle may name anything at all
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor_v2
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name, STORAGE_DTYPES[name])
        raise WeightFileError(f"refused: the weight file names {module}.{name}, which a state dict does not need")

    def persistent_load(self, pid):
        if self._storages is None:
            raise WeightFileError("refused: a persistent id outside the state dict")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise WeightFileError(f"refused: unexpected persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise WeightFileError("refused: malformed storage reference")
        if view_metadata is not None:
            raise WeightFileError("refused: storage views are not supported")
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
        elif (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise WeightFileError(f"storage {key} is declared twice with different types or sizes")
        return known


def _load(stream: io.BufferedIOBase, storages: dict[str, _StorageRef] | None = None):
    try:
        return _RestrictedUnpickler(stream, storages).load()
    except WeightFileError:
        raise
    except Exception as exc:  # a truncated or malformed pickle, whatever opcode it stopped at
        raise WeightFileError(f"not a legacy torch weight file: {type(exc).__name__}: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path | str, sha256: str) -> dict[str, np.ndarray]:
    """The tensors of a legacy torch state dict as contiguous NumPy arrays, by name, in file order.

    ``sha256`` is the checksum the file must have; it is checked before anything is unpickled.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise WeightFileError(f"{path.name} is {size} bytes, more than a weight file this reader accepts")
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise WeightFileError(f"{path.name} has sha256 {actual}, expected {sha256}: refusing to read it")
    with path.open("rb") as f:
        return parse(f.read())


def parse(data: bytes) -> dict[str, np.ndarray]:
    """Parse the bytes of a legacy torch state dict (callers check the checksum first: :func:`read_state_dict`)."""
    stream = io.BytesIO(data)
    if _load(stream) != MAGIC_NUMBER:
        raise WeightFileError("not a legacy torch weight file (wrong magic number)")
    if _load(stream) != PROTOCOL_VERSION:
        raise WeightFileError("unsupported torch serialization protocol")
    info = _load(stream)
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise WeightFileError("only little-endian weight files are supported")
    storages: dict[str, _StorageRef] = {}
    state = _load(stream, storages)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
    ):
        raise WeightFileError("the weight file does not hold a state dict of tensors")
    keys = _load(stream)
    if not isinstance(keys, list) or sorted(keys) != sorted(storages):
        raise WeightFileError("the storage list does not match the tensors' storages")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        storage = storages[key]
        header = stream.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel:
            raise WeightFileError(f"storage {key}: element count missing or different from the declared one")
        raw = stream.read(storage.numel * storage.dtype.itemsize)
        if len(raw) != storage.numel * storage.dtype.itemsize:
            raise WeightFileError(f"storage {key} is truncated")
        arrays[key] = np.frombuffer(raw, storage.dtype)
    if stream.read(1):
        raise WeightFileError("unexpected bytes after the last storage")
    return {name: _materialise(ref, arrays[ref.storage.key]) for name, ref in state.items()}


def _materialise(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """The tensor's view of its storage, bounds-checked, copied into a native-endian contiguous array."""
    if any(n == 0 for n in ref.shape):
        return np.zeros(ref.shape, storage.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= len(storage):
        raise WeightFileError(f"a tensor of shape {ref.shape} reaches past the end of its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :], shape=ref.shape, strides=[s * itemsize for s in ref.stride], writeable=False
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)  # owns its memory
