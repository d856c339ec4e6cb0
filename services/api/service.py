"""The data plane behind the routes: decode images, run them through the batcher, shape the answers.

What only monitoring needs (each input's descriptors for the drift window and the prediction log) is
computed right after the answer, off the request's path: describing a photo costs more than decoding it.
The prediction ids are announced to the log at once, so feedback that arrives first waits for its row.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.api.batching import Batcher
from services.api.drift import DriftMonitor
from services.api.errors import BadRequest, InvalidImage, PayloadTooLarge, Timeout, UnsupportedMediaType, refused_bare
from services.api.keep import UploadQuota
from services.api.memory import IdleTrimmer
from services.api.metrics import ApiMetrics
from services.api.predlog import PredictionLog, Record
from services.api.protocol import FAST_PATH_MIN_BYTES, parse_body, predictions_body
from services.api.runtime import LoadedModel
from shared import images, labels
from shared.descriptors import Loaded, describe_array, load

log = logging.getLogger(__name__)

PARSE_TURN_MIN_BYTES = 4 * 1024 * 1024
"""``/invocations`` bodies above this (two images or more) wait for a parse turn; one image's never does."""


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class _Observation:
    """One answered prediction, waiting to be described and recorded."""

    id: str
    endpoint: str
    model: LoadedModel
    label: str
    confidence: float
    latency_ms: float
    describe: Callable[[], dict[str, float]]
    """Returns the input's descriptors (called in a worker thread)."""
    data: bytes | None = None
    image_format: str | None = None
    domain_distance: float | None = None
    in_domain: bool | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an input looks like the photos the model was trained on, and why not."""

    distance: float | None = None
    neither: float | None = None
    """P(neither): how much it looks like a kind of photo the model learnt to refuse."""
    in_domain: bool | None = None
    """None when the model has no in-domain score."""
    reason: str | None = None
    """``looks_like_refused_kind`` or ``unlike_training_photos`` when out of domain."""


def verdict(row: np.ndarray, model: LoadedModel) -> Verdict:
    """An input's in-domain verdict from its forward pass's row: out of domain when it is too far from the training
    photos, or when it looks like one of the kinds of photo the model refuses."""
    column = model.distance_column
    if column is None or column >= len(row):
        return Verdict()
    distance = float(row[column])
    neither = None
    if model.outputs is not None and model.outputs.neither is not None and model.outputs.neither < len(row):
        neither = float(row[model.outputs.neither])
    if model.neither_threshold is not None and neither is not None and neither > model.neither_threshold:
        return Verdict(distance, neither, False, "looks_like_refused_kind")
    if distance > model.domain_threshold:
        return Verdict(distance, neither, False, "unlike_training_photos")
    return Verdict(distance, neither, True)


def explanation(row: np.ndarray, model: LoadedModel, label: str) -> dict[str, Any] | None:
    """Where the model looked: the class activation map of the answer, as a grid of numbers (logit units: positive
    cells argued for the answer) and as a small translucent PNG to lay over the photo. None when the model has
    no map (versions before it, or served on TensorFlow)."""
    outputs = model.outputs
    if outputs is None or outputs.explain is None or not outputs.grid:
        return None
    cells = outputs.grid * outputs.grid
    evidence = np.asarray(row[outputs.explain : outputs.explain + cells], np.float64)
    evidence = evidence.reshape(outputs.grid, outputs.grid)
    if label != model.labels[0]:
        evidence = -evidence  # the map is dandelion minus grass: for a grass answer, grass's side of it
    return {
        "for": label,
        "grid": [outputs.grid, outputs.grid],
        "evidence": np.round(evidence, 4).tolist(),
        "png": heatmap_png(evidence),
    }


def heatmap_png(evidence: np.ndarray) -> str:
    """A ``data:`` URL of an RGBA PNG of the positive evidence: orange, opaque where it was strongest."""
    import base64
    import io

    from PIL import Image

    top = float(evidence.max())
    strength = np.clip(evidence / top, 0.0, 1.0) if top > 0 else np.zeros_like(evidence)
    rgba = np.zeros((*evidence.shape, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 255, 120, 0
    rgba[..., 3] = np.round(strength * 200).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
        low_confidence: float = 0.7,
        decode_concurrency: int = 2,
        decode_timeout_s: float = 10.0,
        parse_concurrency: int = 1,
        trimmer: IdleTrimmer | None = None,
        keep: UploadQuota | None = None,
    ) -> None:
        self.low_confidence = low_confidence
        """Answers below this confidence say so (``low_confidence``); the page shows them as "not sure"."""
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.max_instances = max_instances
        self.timeout_s = timeout_s
        self.drift = drift
        self.predlog = predlog
        self._background: set[asyncio.Task[None]] = set()
        self._decode_turns = asyncio.Semaphore(decode_concurrency)
        """Decodes under way, across requests: each may hold up to ``limits.max_decode_bytes``."""
        self.decode_timeout_s = decode_timeout_s
        self._parse_turns = asyncio.Semaphore(parse_concurrency)
        self.trimmer = trimmer
        self.keep = keep
        """Which uploads are kept when the prediction log stores them (per client and in all, per hour)."""
        """Told after each decode: a decode may hold up to ``limits.max_decode_bytes`` and free it all at once."""
        """``/invocations`` bodies over ``PARSE_TURN_MIN_BYTES`` parsed at once, across requests: each parse holds
        up to ~6x its body."""

    async def _predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, LoadedModel]:
        """Probabilities ``(n, classes)``, the whole output rows (what :func:`verdict` and :func:`explanation`
        read), and the model that answered."""
        try:
            out, model = await asyncio.wait_for(self.batcher.predict(x), self.timeout_s)
        except TimeoutError:
            raise Timeout(f"the model did not answer within {self.timeout_s:g} s") from None
        classes = len(model.labels)
        probs = np.ascontiguousarray(out[:, :classes])
        if not np.isfinite(probs).all():
            # Finite but absurd inputs (1e38) overflow inside the network: refuse them rather than answer NaN,
            # which would also poison the confidence metrics and the prediction log.
            raise BadRequest("the model's output is not a number for this input: send pixel values in [0, 1]")
        return probs, out, model

    def _low_confidence(self, model: LoadedModel) -> float:
        """The answering version's own "not sure" point, else the API's setting."""
        return model.low_confidence_threshold if model.low_confidence_threshold is not None else self.low_confidence

    def _decode(self, upload: Upload, index: int) -> Loaded:
        try:
            return load(upload.data, self.limits)
        except images.ImageTooLargeError as exc:
            raise PayloadTooLarge(f"{_which(upload, index)}: {exc}") from None
        except images.UnsupportedFormatError as exc:
            raise UnsupportedMediaType(f"{_which(upload, index)}: {exc}") from None
        except images.ImageError as exc:
            raise InvalidImage(f"{_which(upload, index)}: {exc}") from None

    async def _decode_in_turn(self, upload: Upload, index: int) -> Loaded:
        """Decode in a worker thread once a turn is free; the turn is held until the thread is done, even when
        the request gave up on it (timeout, hang-up), because the memory is held until then."""
        deadline = asyncio.get_running_loop().time() + self.decode_timeout_s
        try:
            await asyncio.wait_for(self._decode_turns.acquire(), self.decode_timeout_s)
        except TimeoutError:
            raise Timeout(f"{_which(upload, index)}: not decoded within {self.decode_timeout_s:g} s (busy)") from None
        work = asyncio.get_running_loop().run_in_executor(None, refused_bare, self._decode, upload, index)
        work.add_done_callback(self._decoded)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(work), remaining)
        except TimeoutError:
            raise Timeout(f"{_which(upload, index)}: not decoded within {self.decode_timeout_s:g} s") from None

    def _decoded(self, work: asyncio.Future) -> None:
        self._decode_turns.release()
        if self.trimmer is not None:
            self.trimmer.note(self.trimmer.threshold_bytes)
        if not work.cancelled():
            work.exception()  # retrieved: a refusal nobody waited for any more is not an "unhandled" error

    async def classify(
        self,
        uploads: list[Upload],
        started: float | None = None,
        *,
        explain: bool = False,
        client: str = "unknown",
    ) -> list[dict[str, Any]]:
        """One answer per upload, in order (with ``explain``, where the model looked). Any unusable file fails
        the request with its reason."""
        started = time.perf_counter() if started is None else started
        loaded = await asyncio.gather(*(self._decode_in_turn(upload, i) for i, upload in enumerate(uploads)))
        # Each image is queued on its own, so images of different requests can share a forward pass.
        results = await asyncio.gather(*(self._predict(image.array[np.newaxis]) for image in loaded))
        latency_ms = (time.perf_counter() - started) * 1000
        answers, observations = [], []
        for upload, image, (probs, rows, model) in zip(uploads, loaded, results, strict=True):
            label, confidence, per_class = labels.decode(probs, model.labels)[0]
            judged = verdict(rows[0], model)
            distance, in_domain = judged.distance, judged.in_domain
            self.metrics.served([label], [confidence], model.version, None if in_domain is None else [in_domain])
            prediction_id = uuid.uuid4().hex
            stored = upload.data if self.predlog is not None and self.predlog.stores_uploads else None
            if stored is not None and self.keep is not None and not self.keep.allow(client, len(stored)):
                stored = None
                self.metrics.uploads_dropped.labels(reason="quota").inc()
            observations.append(
                _Observation(prediction_id, "predict", model, label, confidence, latency_ms, image.describe,
                             stored, image.format, distance, in_domain)
            )  # fmt: skip
            answer = {
                "id": prediction_id,
                "label": label,
                "confidence": confidence,
                "low_confidence": confidence < self._low_confidence(model),
                # Nothing is hidden: an image unlike the training photos still gets its label, and says so.
                "in_domain": in_domain,
                "domain_distance": distance,
                "neither": judged.neither,
                "out_of_domain_reason": judged.reason,
                "probabilities": per_class,
                "model": {"name": model.name, "version": model.version},
                "filename": upload.filename,
            }
            if explain:
                answer["explain"] = explanation(rows[0], model, label)
            answers.append(answer)
        self._observe_later(observations)
        return answers

    async def invocations(
        self, body: bytes, started: float | None = None
    ) -> tuple[bytes, LoadedModel, list[str], list[bool] | None]:
        """An MLflow scoring request -> its ``{"predictions": ...}`` body, the model that answered, the ids, and
        whether each input looks like the training photos (None: the model has no in-domain score)."""
        started = time.perf_counter() if started is None else started
        if len(body) > PARSE_TURN_MIN_BYTES:
            async with self._parse_turns:
                x = await asyncio.to_thread(parse_body, body, self.max_instances)
        elif len(body) > FAST_PATH_MIN_BYTES:
            x = await asyncio.to_thread(parse_body, body, self.max_instances)
        else:
            x = parse_body(body, self.max_instances)
        _check_range(x)
        probs, rows, model = await self._predict(x)
        latency_ms = (time.perf_counter() - started) * 1000
        decoded = labels.decode(probs, model.labels)
        judged = [verdict(row, model) for row in rows]
        domain = [(v.distance, v.in_domain) for v in judged]
        flags = None if model.distance_column is None else [bool(v.in_domain) for v in judged]
        self.metrics.served([d[0] for d in decoded], [d[1] for d in decoded], model.version, flags)
        observations = [
            _Observation(uuid.uuid4().hex, "invocations", model, label, confidence, latency_ms,
                         functools.partial(describe_array, image), None, None, distance, in_domain)
            for (label, confidence, _), image, (distance, in_domain) in zip(decoded, x, domain, strict=True)
        ]  # fmt: skip
        self._observe_later(observations)
        return predictions_body(probs), model, [o.id for o in observations], flags

    def _observe_later(self, observations: list[_Observation]) -> None:
        """Announce the ids to the log now; describe the inputs and feed the drift window and the log next."""
        if not observations or (self.drift is None and self.predlog is None):
            return
        if self.predlog is not None:
            for observation in observations:
                self.predlog.expect(observation.id)
        task = asyncio.create_task(self._observe(observations), name="observe")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _observe(self, observations: list[_Observation]) -> None:
        try:
            described = await asyncio.to_thread(lambda: [o.describe() for o in observations])
        except Exception:  # monitoring must never fail a request, nor leave feedback waiting for a row
            log.exception("describing %d inputs failed; they are not logged", len(observations))
            if self.predlog is not None:
                for observation in observations:
                    self.predlog.forget(observation.id)
            return
        for o, descriptors in zip(observations, described, strict=True):
            if self.drift is not None:
                self.drift.observe(descriptors, o.confidence, o.in_domain)
            if self.predlog is not None:
                self.predlog.record(
                    Record(o.id, o.endpoint, o.model.name, o.model.version, o.label, o.confidence, o.latency_ms,
                           descriptors, o.data, o.image_format, o.domain_distance, o.in_domain)
                )  # fmt: skip

    async def drain(self) -> None:
        """Wait for the observations still being described (at shutdown, before the log's last flush)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] a pixel value may stray (float rounding of x / 255) before the input is refused."""


def _check_range(x: np.ndarray) -> None:
    """Refuse inputs outside [0, 1]: 0-255 pixels (the commonest client mistake) would otherwise get a
    confident, meaningless answer. A deliberate difference from ``mlflow models serve``, which answers them."""
    low, high = float(x.min()), float(x.max())
    if low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
        return
    if not (np.isfinite(low) and np.isfinite(high)):
        raise BadRequest("inputs must be pixel values in [0, 1]; this input holds values that are not finite numbers")
    hint = ": divide 0-255 pixel values by 255" if 1 < high <= 255 and low >= 0 else ""
    raise BadRequest(f"inputs must be pixel values in [0, 1]; this input has values from {low:g} to {high:g}{hint}")


def _which(upload: Upload, index: int) -> str:
    name = (upload.filename or "")[:100]
    return f"file {index + 1}" + (f" ({name!r})" if name else "")
