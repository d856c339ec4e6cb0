"""The frozen backbone as a feature extractor: an image file -> the pooled features of each of its views.

Embeddings are computed on LiteRT, the runtime the API serves with, one image per pass: XNNPACK's cheapest pass
size on these CPUs, and the same bits for an image whatever else is computed beside it, so two shards computed
by two processes equal one process's run exactly. The LiteRT flatbuffer of the feature model is built once per
:class:`EmbeddingSpec` (TensorFlow converts it in ~10 s) and kept in the object store beside the embeddings, so
shards and later runs load it without TensorFlow.

Views of a photo: ``full`` (the shared preprocessing, what the API sees), ``mirror`` (its mirror image: the
head learns from both), and ``small``: the photo shrunk to :data:`SMALL_SIDE` px on its longer side and
re-encoded as a JPEG, the way thumbnails and chat apps send it, then preprocessed as any upload is (only to
judge the model on small photos: as a training view it did not help, see docs/model.md).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.images import MODEL_SIZE, decode, to_array

SMALL_SIDE = 128
"""The longer side of the ``small`` view (thumbnails and chat apps send 128 px and less)."""
VIEWS = ("full", "mirror", "small")
TRAINING_VIEWS = ("full", "mirror")
"""The views the head is fitted on and the in-domain bank is made of."""
EXTRACTOR_FILE = "extractor.tflite"


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """What an embedding was computed with: a change of any part is a new embedding of every image."""

    backbone: str
    resolution: int
    weights_sha256: str

    @property
    def key(self) -> str:
        return f"efficientnet-{self.backbone}@{self.resolution}-{self.weights_sha256[:12]}"

    @classmethod
    def of(cls, backbone: str, resolution: int) -> EmbeddingSpec:
        from services.trainer.backbone import VARIANTS

        return cls(backbone, resolution, VARIANTS[backbone].sha256)


def view_arrays(data: bytes, small: bool = True) -> dict[str, np.ndarray]:
    """The model inputs (float32 ``(224, 224, 3)`` in [0, 1]) of each view of one image file."""
    image = decode(data).image
    full = to_array(image)
    views = {"full": full, "mirror": np.ascontiguousarray(full[:, ::-1])}
    if small:
        thumbnail = image.copy()
        thumbnail.thumbnail((SMALL_SIDE, SMALL_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        thumbnail.save(buffer, "JPEG", quality=85)
        views["small"] = to_array(decode(buffer.getvalue()).image)
    return views


class Extractor:
    """The feature model on one LiteRT interpreter: float32 ``(224, 224, 3)`` -> float32 ``(features,)``.
    Not thread-safe: one per thread or process."""

    def __init__(self, flatbuffer: bytes, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.flatbuffer = flatbuffer
        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        (source,) = self._interpreter.get_input_details()
        (target,) = self._interpreter.get_output_details()
        self._input, self._output = source["index"], target["index"]
        self._interpreter.resize_tensor_input(self._input, (1, MODEL_SIZE, MODEL_SIZE, 3), strict=True)
        self._interpreter.allocate_tensors()
        self.features = int(target["shape"][-1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(x, np.float32)[np.newaxis])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0].copy()

    def many(self, x: np.ndarray) -> np.ndarray:
        """``(n, 224, 224, 3)`` -> ``(n, features)``, one pass each."""
        return np.stack([self(row) for row in x]) if len(x) else np.zeros((0, self.features), np.float32)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.flatbuffer).hexdigest()[:16]


def build_flatbuffer(spec: EmbeddingSpec, weights_path=None) -> bytes:
    """The feature model of ``spec`` (the serving model's front: resize, normalise, backbone, pooling) as a LiteRT
    flatbuffer, checked against Keras. Needs TensorFlow."""
    from services.trainer import backbone
    from services.trainer.export import frozen_litert
    from services.trainer.model import feature_model

    variant = backbone.VARIANTS[spec.backbone]
    features = feature_model(backbone.build(variant, backbone.load_weights(variant, weights_path)), spec.resolution)
    return frozen_litert(features)
