"""Writes files in torch's legacy serialization by hand (opcode by opcode), so tests need no torch: well-formed
state dicts, and hostile ones that name globals a state dict never needs."""

from __future__ import annotations

import pickle
import pickletools
import struct

import numpy as np

from services.trainer.weightfile import MAGIC_NUMBER, PROTOCOL_VERSION

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


def _value(obj) -> bytes:
    """The opcodes of a plain value (int, str, bool, None, tuple of those), without PROTO and STOP."""
    return pickletools.optimize(pickle.dumps(obj, protocol=2))[2:-1]  # optimize: no memo puts to collide


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def _call(function: bytes, *args: bytes) -> bytes:
    return function + _tuple(*args) + b"R"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def legacy_file(
    tensors: dict[str, np.ndarray], *, transposed: frozenset[str] = frozenset(), extra_object: bytes = b""
) -> bytes:
    """A legacy ``.pth`` of ``tensors``. Names in ``transposed`` are stored as a strided view of a transposed
    storage (as converted TensorFlow weights are); ``extra_object`` is spliced in as one more dict item."""
    items, storages = [], []
    for i, (name, array) in enumerate(tensors.items()):
        key = str(1000 + i)
        if name in transposed:
            data = np.ascontiguousarray(array.T)  # storage in reversed axis order; the view undoes it
            stride = tuple(int(s) for s in np.cumprod((1, *array.shape[:-1])))
        else:
            data = array.copy(order="C")  # (ascontiguousarray would make a 0-d tensor 1-d)
            stride = tuple(int(s) // array.itemsize for s in data.strides)
        storage_type = _global("torch", STORAGE_NAMES[array.dtype])
        pid = _tuple(_value("storage"), storage_type, _value(key), _value("cpu"), _value(int(array.size)), b"N")
        tensor = _call(
            _global("torch._utils", "_rebuild_tensor_v2"),
            pid + b"Q",
            _value(0),
            _value(tuple(int(n) for n in array.shape)),
            _value(stride),
            b"\x89",
            _call(_global("collections", "OrderedDict")),
        )
        items.append(_value(name) + tensor)
        storages.append((key, data))
    state = _call(_global("collections", "OrderedDict")) + b"(" + b"".join(items) + extra_object + b"u"
    out = [
        pickle.dumps(MAGIC_NUMBER, protocol=2),
        pickle.dumps(PROTOCOL_VERSION, protocol=2),
        pickle.dumps({"protocol_version": PROTOCOL_VERSION, "little_endian": True}, protocol=2),
        _pickle(state),
        pickle.dumps([key for key, _ in storages], protocol=2),
    ]
    for _, data in storages:
        out.append(struct.pack("<q", data.size) + data.astype(data.dtype.newbyteorder("<")).tobytes())
    return b"".join(out)


def hostile_item(module: str, name: str, argument: str) -> bytes:
    """A dict item whose value calls ``module.name(argument)`` when unpickled by a trusting reader."""
    return _value("payload") + _call(_global(module, name), _value(argument))
