"""The loaded model and its lifecycle: load at start with backoff, poll the alias, swap atomically.

A :class:`LoadedModel` is immutable; the runtime replaces its reference in one assignment, so a batch
that took the old model finishes on the old model and every response names the version it used.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from services.api.metrics import ApiMetrics
from shared.images import MODEL_SIZE
from shared.labels import LABELS
from shared.settings import RegistrySettings

log = logging.getLogger(__name__)

WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    alias: str
    run_id: str
    labels: tuple[str, ...]
    forward: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    """float32 ``(n, 224, 224, 3)`` -> ``(n, len(labels))`` probabilities. Called from one thread at a time."""
    input_shape: tuple[int, ...] = (-1, MODEL_SIZE, MODEL_SIZE, 3)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    metadata: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "labels": list(self.labels),
            "input_shape": list(self.input_shape),
            "loaded_at": self.loaded_at.isoformat(),
            "metadata": self.metadata,
        }


class ModelSource(Protocol):
    """Where models come from: the MLflow registry in production, a fake in unit tests."""

    def resolve(self) -> tuple[str, str]:
        """``(version, run_id)`` the alias points to now; raises when the registry cannot say."""
        ...

    def load(self, version: str, run_id: str) -> LoadedModel:
        """Download, load and warm up ``version``; blocking (runs in a thread)."""
        ...


class MlflowSource:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        # The runtime retries with its own backoff and keeps serving meanwhile; MLflow's default of
        # seven retries per call would hide an outage for minutes. Explicit settings still win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if settings.s3_endpoint_url:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.settings.tracking_uri, self.settings.tracking_uri)

    def resolve(self) -> tuple[str, str]:
        version = self._client().get_model_version_by_alias(self.settings.model_name, self.settings.model_alias)
        return str(version.version), version.run_id

    def load(self, version: str, run_id: str) -> LoadedModel:
        import mlflow
        from mlflow.models import Model

        mlflow.set_tracking_uri(self.settings.tracking_uri)
        uri = f"models:/{self.settings.model_name}/{version}"
        with tempfile.TemporaryDirectory(prefix="model-") as tmp:
            path = mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=self.settings.tracking_uri)
            meta = Model.load(path)
            keras_model = mlflow.tensorflow.load_model(path)
        metadata = dict(meta.metadata or {})
        labels = tuple(metadata.get("labels", LABELS))
        return LoadedModel(
            name=self.settings.model_name,
            version=version,
            alias=self.settings.model_alias,
            run_id=run_id,
            labels=labels,
            forward=compile_forward(keras_model),
            metadata=metadata,
        )


def compile_forward(keras_model) -> Callable[[np.ndarray], np.ndarray]:
    """The model as one traced ``tf.function`` with a fixed input signature, warmed for common batch sizes.

    Calling it costs a fraction of ``model.predict`` (no per-call dataset and callbacks machinery).
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32)], reduce_retracing=True)
    def traced(x):
        return keras_model(x, training=False)

    def forward(x: np.ndarray) -> np.ndarray:
        return traced(tf.convert_to_tensor(x, tf.float32)).numpy()

    for n in WARMUP_BATCH_SIZES:
        forward(np.zeros((n, MODEL_SIZE, MODEL_SIZE, 3), np.float32))
    return forward


class ModelRuntime:
    """Keeps a model loaded: first load with backoff (live but not ready until then), then polling."""

    def __init__(
        self,
        source: ModelSource,
        metrics: ApiMetrics,
        poll_interval_s: float,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self.metrics.ready.set(0)

    @property
    def ready(self) -> bool:
        return self.current is not None

    async def run(self) -> None:
        """Forever: make sure the alias's version is the one loaded. Cancel to stop."""
        delay = self.retry_initial_s
        try:
            while True:
                try:
                    await self.refresh()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.metrics.load_failures.inc()
                    self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning(
                        "model refresh failed (%s); %s",
                        self.last_error,
                        "keeping the current model" if self.current else f"retrying in {delay:.1f} s",
                    )
                    if self.current is None:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self.retry_max_s)
                        continue
                else:
                    delay = self.retry_initial_s
                await asyncio.sleep(self.poll_interval_s)
        finally:
            self._loader.shutdown(wait=False, cancel_futures=True)

    async def refresh(self) -> bool:
        """Load the alias's version if it is not the one being served; True when a new model was swapped in."""
        loop = asyncio.get_running_loop()
        version, run_id = await loop.run_in_executor(self._loader, self.source.resolve)
        if self.current is not None and self.current.version == version:
            return False
        log.info("loading model version %s (run %s)", version, run_id)
        model = await loop.run_in_executor(self._loader, self.source.load, version, run_id)
        previous, self.current = self.current, model
        self.last_error = None
        self.metrics.model_loaded(model.name, model.version, model.alias, model.run_id)
        # Long-lived objects (TensorFlow, MLflow, the model) out of the collector's sight: no 300 ms pauses.
        gc.collect()
        gc.freeze()
        log.info("serving %s version %s%s", model.name, model.version, f" (was {previous.version})" if previous else "")
        return True
