"""The data plane behind the routes: decode images, run them through the batcher, shape the answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.api.batching import Batcher
from services.api.errors import InvalidImage, PayloadTooLarge, Timeout
from services.api.metrics import ApiMetrics
from services.api.protocol import parse_body, predictions_body
from services.api.runtime import LoadedModel
from shared import images, labels


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str | None
    data: bytes


class Classifier:
    def __init__(
        self, batcher: Batcher, metrics: ApiMetrics, limits: images.ImageLimits, max_instances: int, timeout_s: float
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.max_instances = max_instances
        self.timeout_s = timeout_s

    async def _predict(self, x: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        try:
            return await asyncio.wait_for(self.batcher.predict(x), self.timeout_s)
        except TimeoutError:
            raise Timeout(f"the model did not answer within {self.timeout_s:g} s") from None

    def _decode(self, upload: Upload, index: int) -> np.ndarray:
        try:
            return images.preprocess(upload.data, self.limits)
        except images.ImageTooLargeError as exc:
            raise PayloadTooLarge(f"{_which(upload, index)}: {exc}") from None
        except images.ImageError as exc:
            raise InvalidImage(f"{_which(upload, index)}: {exc}") from None

    async def classify(self, uploads: list[Upload]) -> list[dict[str, Any]]:
        """One answer per upload, in order. Any unusable file fails the request with its reason."""
        arrays = await asyncio.gather(*(asyncio.to_thread(self._decode, upload, i) for i, upload in enumerate(uploads)))
        # Each image is queued on its own, so images of different requests can share a forward pass.
        results = await asyncio.gather(*(self._predict(array[np.newaxis]) for array in arrays))
        answers = []
        for upload, (probs, model) in zip(uploads, results, strict=True):
            label, confidence, per_class = labels.decode(probs, model.labels)[0]
            self.metrics.served([label], [confidence])
            answers.append(
                {
                    "label": label,
                    "confidence": confidence,
                    "probabilities": per_class,
                    "model": {"name": model.name, "version": model.version},
                    "filename": upload.filename,
                }
            )
        return answers

    async def invocations(self, body: bytes) -> tuple[bytes, LoadedModel]:
        """An MLflow scoring request -> its ``{"predictions": ...}`` body, and the model that answered."""
        x = (
            await asyncio.to_thread(parse_body, body, self.max_instances)
            if len(body) > 65536
            else parse_body(body, self.max_instances)
        )
        probs, model = await self._predict(x)
        decoded = labels.decode(probs, model.labels)
        self.metrics.served([d[0] for d in decoded], [d[1] for d in decoded])
        return predictions_body(probs), model


def _which(upload: Upload, index: int) -> str:
    name = (upload.filename or "")[:100]
    return f"file {index + 1}" + (f" ({name!r})" if name else "")
