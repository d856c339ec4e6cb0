"""The data plane behind the routes: decode images, run them through the batcher, shape the answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.api.batching import Batcher
from services.api.drift import DriftMonitor
from services.api.errors import BadRequest, InvalidImage, PayloadTooLarge, Timeout
from services.api.metrics import ApiMetrics
from services.api.predlog import PredictionLog, Record
from services.api.protocol import parse_body, predictions_body
from services.api.runtime import LoadedModel
from shared import images, labels
from shared.descriptors import Prepared, describe_array, prepare


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str | None
    data: bytes


class Classifier:
    def __init__(
        self,
        batcher: Batcher,
        metrics: ApiMetrics,
        limits: images.ImageLimits,
        max_instances: int,
        timeout_s: float,
        *,
        drift: DriftMonitor | None = None,
        predlog: PredictionLog | None = None,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.max_instances = max_instances
        self.timeout_s = timeout_s
        self.drift = drift
        self.predlog = predlog

    async def _predict(self, x: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        try:
            probs, model = await asyncio.wait_for(self.batcher.predict(x), self.timeout_s)
        except TimeoutError:
            raise Timeout(f"the model did not answer within {self.timeout_s:g} s") from None
        if not np.isfinite(probs).all():
            # Finite but absurd inputs (1e38) overflow inside the network: refuse them rather than answer NaN,
            # which would also poison the confidence metrics and the prediction log.
            raise BadRequest("the model's output is not a number for this input: send pixel values in [0, 1]")
        return probs, model

    def _decode(self, upload: Upload, index: int) -> Prepared:
        try:
            return prepare(upload.data, self.limits)
        except images.ImageTooLargeError as exc:
            raise PayloadTooLarge(f"{_which(upload, index)}: {exc}") from None
        except images.ImageError as exc:
            raise InvalidImage(f"{_which(upload, index)}: {exc}") from None

    async def classify(self, uploads: list[Upload], started: float | None = None) -> list[dict[str, Any]]:
        """One answer per upload, in order. Any unusable file fails the request with its reason."""
        started = time.perf_counter() if started is None else started
        prepared = await asyncio.gather(
            *(asyncio.to_thread(self._decode, upload, i) for i, upload in enumerate(uploads))
        )
        # Each image is queued on its own, so images of different requests can share a forward pass.
        results = await asyncio.gather(*(self._predict(p.array[np.newaxis]) for p in prepared))
        latency_ms = (time.perf_counter() - started) * 1000
        answers = []
        for upload, image, (probs, model) in zip(uploads, prepared, results, strict=True):
            label, confidence, per_class = labels.decode(probs, model.labels)[0]
            self.metrics.served([label], [confidence])
            prediction_id = self._observe(
                "predict", model, label, confidence, latency_ms, image.descriptors, upload.data, image.format
            )
            answers.append(
                {
                    "id": prediction_id,
                    "label": label,
                    "confidence": confidence,
                    "probabilities": per_class,
                    "model": {"name": model.name, "version": model.version},
                    "filename": upload.filename,
                }
            )
        return answers

    async def invocations(self, body: bytes, started: float | None = None) -> tuple[bytes, LoadedModel, list[str]]:
        """An MLflow scoring request -> its ``{"predictions": ...}`` body, the model that answered, the ids."""
        started = time.perf_counter() if started is None else started
        if len(body) > 65536:
            x = await asyncio.to_thread(parse_body, body, self.max_instances)
        else:
            x = parse_body(body, self.max_instances)
        monitored = self.drift is not None or self.predlog is not None
        prediction, descriptors = await asyncio.gather(
            self._predict(x), asyncio.to_thread(_describe_all, x) if monitored else _nothing()
        )
        probs, model = prediction
        latency_ms = (time.perf_counter() - started) * 1000
        decoded = labels.decode(probs, model.labels)
        self.metrics.served([d[0] for d in decoded], [d[1] for d in decoded])
        ids = [
            self._observe("invocations", model, label, confidence, latency_ms, described)
            for (label, confidence, _), described in zip(decoded, descriptors or [{}] * len(decoded), strict=True)
        ]
        return predictions_body(probs), model, ids

    def _observe(
        self,
        endpoint: str,
        model: LoadedModel,
        label: str,
        confidence: float,
        latency_ms: float,
        descriptors: dict[str, float],
        data: bytes | None = None,
        image_format: str | None = None,
    ) -> str:
        """Feed one prediction to the drift window and the prediction log; its id."""
        prediction_id = uuid.uuid4().hex
        if self.drift is not None and descriptors:
            self.drift.observe(descriptors, confidence)
        if self.predlog is not None and descriptors:
            stored = data if self.predlog.stores_uploads else None
            self.predlog.record(
                Record(
                    prediction_id, endpoint, model.name, model.version, label, confidence, latency_ms,
                    descriptors, stored, image_format,
                )
            )  # fmt: skip
        return prediction_id


def _describe_all(x: np.ndarray) -> list[dict[str, float]]:
    return [describe_array(image) for image in x]


async def _nothing() -> None:
    return None


def _which(upload: Upload, index: int) -> str:
    name = (upload.filename or "")[:100]
    return f"file {index + 1}" + (f" ({name!r})" if name else "")
