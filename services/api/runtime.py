"""The loaded model and its lifecycle: load at start with backoff, poll the alias, swap atomically.

A :class:`LoadedModel` is immutable; the runtime replaces its reference in one assignment, so a batch
that took the old model finishes on the old model and every response names the version it used.

A model version that carries the trainer's LiteRT export (:mod:`services.trainer.export`) runs on the
LiteRT interpreter, and TensorFlow is never imported: the process is ~700 MB lighter and ready seconds
sooner. A version without it (or ``API_RUNTIME=tensorflow``) runs on TensorFlow as one traced function.
Against an MLflow tracking server over plain HTTP(S), the alias, the MLmodel file and the LiteRT file are
read through MLflow's REST API (:class:`RestRegistry`), so ``import mlflow`` (~3 s and ~200 MB) is not
paid either; any other registry, or a version to run on TensorFlow, goes through MLflow's client.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from services.api.metrics import ApiMetrics
from shared.images import MODEL_SIZE
from shared.labels import LABELS
from shared.settings import RegistrySettings

log = logging.getLogger(__name__)

WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16)
LITERT_FILE = "model.tflite"
"""The trainer's LiteRT export, logged with the model as an MLflow extra file (same name as in the trainer)."""
Runtime = Literal["auto", "litert", "tensorflow"]


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
    runtime: str = "python"
    """What runs the forward pass: ``litert``, ``tensorflow`` (or a test double's name)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "labels": list(self.labels),
            "input_shape": list(self.input_shape),
            "loaded_at": self.loaded_at.isoformat(),
            "metadata": {k: v for k, v in self.metadata.items() if k != "drift_reference"},
            "drift_reference": _reference_summary(self.metadata.get("drift_reference")),
            "runtime": self.runtime,
        }


def _reference_summary(spec: Any) -> dict[str, Any] | None:
    if not isinstance(spec, dict):
        return None
    return {"source": spec.get("source"), "samples": spec.get("samples"), "features": sorted(spec.get("features", {}))}


class ModelSource(Protocol):
    """Where models come from: the MLflow registry in production, a fake in unit tests."""

    def resolve(self) -> tuple[str, str]:
        """``(version, run_id)`` the alias points to now; raises when the registry cannot say."""
        ...

    def load(self, version: str, run_id: str) -> LoadedModel:
        """Download, load and warm up ``version``; blocking (runs in a thread)."""
        ...


class RegistryError(RuntimeError):
    """The tracking server refused or failed a request."""


class RestRegistry:
    """What the API needs from an MLflow tracking server, over its REST API, without importing MLflow.

    Covers the server this project deploys (no authentication; artifacts proxied by the server or in
    S3). :meth:`fetch` returns None for any other artifact store, and the caller then uses MLflow.
    """

    AUTH_VARIABLES = (
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_AUTH",
        "MLFLOW_TRACKING_INSECURE_TLS",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    )

    def __init__(self, settings: RegistrySettings, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.base = settings.tracking_uri.rstrip("/")
        self.timeout_s = timeout_s

    @classmethod
    def serves(cls, settings: RegistrySettings) -> bool:
        """True for a plain ``http(s)://`` server; credentials and TLS options are MLflow's client's business."""
        plain = settings.tracking_uri.startswith(("http://", "https://"))
        return plain and not any(os.environ.get(name) for name in cls.AUTH_VARIABLES)

    def _get(self, path: str, **params: str) -> bytes:
        import httpx

        try:
            response = httpx.get(f"{self.base}{path}", params=params, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise RegistryError(f"{self.base} did not answer: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                error = response.json()
                reason = f"{error.get('error_code', '')}: {error.get('message', '')}"
            except ValueError:
                reason = response.text
            raise RegistryError(f"{path} answered HTTP {response.status_code}: {reason[:300]}")
        return response.content

    def resolve(self) -> tuple[str, str]:
        import orjson

        body = self._get(
            "/api/2.0/mlflow/registered-models/alias", name=self.settings.model_name, alias=self.settings.model_alias
        )
        version = orjson.loads(body)["model_version"]
        return str(version["version"]), version.get("run_id", "")

    def artifact_uri(self, version: str) -> str:
        import orjson

        body = self._get(
            "/api/2.0/mlflow/model-versions/get-download-uri", name=self.settings.model_name, version=version
        )
        return orjson.loads(body)["artifact_uri"]

    def fetch(self, artifact_uri: str, path: str) -> bytes | None:
        """The bytes of ``path`` under ``artifact_uri``; None when the store is not one this class reads."""
        from urllib.parse import quote, urlparse

        location = urlparse(artifact_uri)
        key = f"{location.path.strip('/')}/{path}"
        if location.scheme == "mlflow-artifacts" and not location.netloc:
            return self._get(f"/api/2.0/mlflow-artifacts/artifacts/{quote(key)}")
        if location.scheme == "s3":
            import boto3

            s3 = boto3.client("s3", endpoint_url=self.settings.s3_endpoint_url)
            return s3.get_object(Bucket=location.netloc, Key=key)["Body"].read()
        return None


class MlflowSource:
    def __init__(self, settings: RegistrySettings, runtime: Runtime = "auto", threads: int | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.threads = threads or os.cpu_count() or 1
        self.rest = RestRegistry(settings) if RestRegistry.serves(settings) else None
        # The runtime retries with its own backoff and keeps serving meanwhile; MLflow's default of
        # seven retries per call would hide an outage for minutes. Explicit settings still win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if settings.s3_endpoint_url:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.settings.tracking_uri, self.settings.tracking_uri)

    def describe(self) -> str:
        s = self.settings
        return f"the registry at {s.tracking_uri}, asked for {s.model_name}@{s.model_alias},"

    def resolve(self) -> tuple[str, str]:
        if self.rest is not None:
            return self.rest.resolve()
        version = self._client().get_model_version_by_alias(self.settings.model_name, self.settings.model_alias)
        return str(version.version), version.run_id

    def load(self, version: str, run_id: str) -> LoadedModel:
        if self.rest is not None and self.runtime != "tensorflow":
            model = self._load_over_rest(self.rest, version, run_id)
            if model is not None:
                return model
        return self._load_with_mlflow(version, run_id)

    def _load_over_rest(self, rest: RestRegistry, version: str, run_id: str) -> LoadedModel | None:
        """The LiteRT model read over the REST API; None when MLflow's client has to do it."""
        import yaml

        artifact_uri = rest.artifact_uri(version)
        mlmodel = rest.fetch(artifact_uri, "MLmodel")
        if mlmodel is None:
            return None
        meta = yaml.safe_load(mlmodel)
        litert = litert_path(meta.get("flavors") or {})
        if litert is None:
            if self.runtime == "litert":
                raise _no_export(version)
            return None
        flatbuffer = rest.fetch(artifact_uri, litert)
        if flatbuffer is None:
            return None
        return self._model(version, run_id, litert_forward(flatbuffer, self.threads), "litert", meta.get("metadata"))

    def _load_with_mlflow(self, version: str, run_id: str) -> LoadedModel:
        import mlflow
        from mlflow.models import Model
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        uri = f"models:/{self.settings.model_name}/{version}"
        tracking_uri = self.settings.tracking_uri
        mlflow.set_tracking_uri(tracking_uri)  # artifact repositories proxied by the server read it
        repo = ModelsArtifactRepository(uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="model-") as tmp:
            # MLmodel first: with a LiteRT export, that one file is all that is downloaded besides it.
            meta = Model.load(repo.download_artifacts("MLmodel", dst_path=tmp))
            litert = litert_path(meta.flavors or {}) if self.runtime != "tensorflow" else None
            if litert is not None:
                flatbuffer = Path(repo.download_artifacts(litert, dst_path=tmp)).read_bytes()
                forward, runtime = litert_forward(flatbuffer, self.threads), "litert"
            elif self.runtime == "litert":
                raise _no_export(version)
            else:
                import mlflow.tensorflow

                path = mlflow.artifacts.download_artifacts(uri, dst_path=f"{tmp}/all", tracking_uri=tracking_uri)
                forward, runtime = compile_forward(mlflow.tensorflow.load_model(path)), "tensorflow"
        return self._model(version, run_id, forward, runtime, meta.metadata)

    def _model(
        self, version: str, run_id: str, forward: Callable[[np.ndarray], np.ndarray], runtime: str, metadata
    ) -> LoadedModel:
        metadata = dict(metadata or {})
        return LoadedModel(
            name=self.settings.model_name,
            version=version,
            alias=self.settings.model_alias,
            run_id=run_id,
            labels=tuple(metadata.get("labels", LABELS)),
            forward=forward,
            metadata=metadata,
            runtime=runtime,
        )


def _no_export(version: str) -> RuntimeError:
    return RuntimeError(f"version {version} has no LiteRT export ({LITERT_FILE}) and API_RUNTIME is 'litert'")


def litert_path(flavors: dict[str, Any]) -> str | None:
    """Where the LiteRT export is inside the logged model (``extra_files/model.tflite``), if it has one."""
    for flavor in flavors.values():
        for extra in flavor.get("extra_files") or ():
            path = extra.get("path", "") if isinstance(extra, dict) else str(extra)
            if path.rsplit("/", 1)[-1] == LITERT_FILE:
                return path
    return None


class LiteRtForward:
    """A LiteRT interpreter as the forward function; re-allocates only when the batch size changes.

    A batch larger than ``chunk`` runs as consecutive passes of ``chunk`` images: on a small CPU a large
    batch costs *more* per image (its activations leave the caches), so the batcher's batches are cut to
    the size that :func:`litert_forward` measured to be cheapest. Not thread-safe (one interpreter, one
    set of buffers): the batcher calls it from one thread.
    """

    def __init__(self, flatbuffer: bytes, threads: int, chunk: int = 1 << 16) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._flatbuffer = flatbuffer  # the interpreter reads the model from this buffer
        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        (source,) = self._interpreter.get_input_details()
        (target,) = self._interpreter.get_output_details()
        self._input, self._output = source["index"], target["index"]
        self._rows = -1
        self.chunk = chunk

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.chunk:
            return self._pass(x)
        return np.concatenate([self._pass(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])

    def _pass(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._rows:
            self._interpreter.resize_tensor_input(self._input, x.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._rows = x.shape[0]
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy: the next pass reuses the buffers


def litert_forward(flatbuffer: bytes, threads: int, rounds: int = 2) -> LiteRtForward:
    """The LiteRT model as the forward function, warmed up, its pass size set to the cheapest per image."""
    forward = LiteRtForward(flatbuffer, threads)
    sizes = sorted(WARMUP_BATCH_SIZES, reverse=True)  # largest first: buffers sized once, smaller re-allocate fast
    inputs = {n: np.zeros((n, MODEL_SIZE, MODEL_SIZE, 3), np.float32) for n in sizes}
    for n in sizes:
        forward(inputs[n])
    per_image = {n: float("inf") for n in sizes}
    for _ in range(rounds):  # interleaved, best of rounds: the least disturbed by other processes
        for n in sizes:
            started = time.perf_counter()
            forward(inputs[n])
            per_image[n] = min(per_image[n], (time.perf_counter() - started) / n)
    forward.chunk = min(per_image, key=per_image.get)
    log.info(
        "LiteRT with %d threads: ms per image by pass size %s; passes of at most %d",
        threads,
        {n: round(t * 1000, 2) for n, t in sorted(per_image.items())},
        forward.chunk,
    )
    return forward


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


NOT_REGISTERED_MARKERS = ("RESOURCE_DOES_NOT_EXIST", "not found", "NOT_FOUND", "does not exist")


def failure_kind(exc: BaseException) -> str:
    """What went wrong, as a category safe to show anyone (the details, which can name hosts and paths, are
    logged): ``no_model_registered``, ``registry_unreachable`` or ``load_failed``."""
    text = f"{type(exc).__name__}: {exc}"
    if any(marker in text for marker in NOT_REGISTERED_MARKERS):
        return "no_model_registered"
    unreachable = ("did not answer", "ConnectError", "ConnectionError", "Timeout", "Max retries", "Connection refused")
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(marker in text for marker in unreachable):
        return "registry_unreachable"
    return "load_failed"


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
        """The last refresh failure in full: for the log and the operator, never for a client."""
        self.last_error_kind: str | None = None
        """Its category (:func:`failure_kind`): what probes and error messages may show."""
        self.on_swap: list[Callable[[LoadedModel], None]] = []
        """Called (on the event loop) with each model swapped in, the first one included."""
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
                    self.last_error_kind = failure_kind(exc)
                    log.warning(
                        "model refresh failed (%s); %s",
                        self._explain(exc),
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

    def _explain(self, exc: BaseException) -> str:
        """The failure for the log, with what was asked of whom when the answer is "no such model"."""
        if self.last_error_kind == "no_model_registered" and (where := getattr(self.source, "describe", None)):
            return f"{where()} has no such model: the trainer has not registered one there yet ({self.last_error})"
        return self.last_error or f"{type(exc).__name__}"

    async def refresh(self) -> bool:
        """Load the alias's version if it is not the one being served; True when a new model was swapped in."""
        loop = asyncio.get_running_loop()
        version, run_id = await loop.run_in_executor(self._loader, self.source.resolve)
        if self.current is not None and self.current.version == version:
            return False
        log.info("loading model version %s (run %s)", version, run_id)
        model = await loop.run_in_executor(self._loader, self.source.load, version, run_id)
        previous, self.current = self.current, model
        self.last_error = self.last_error_kind = None
        self.metrics.model_loaded(model.name, model.version, model.alias, model.run_id)
        for callback in self.on_swap:
            callback(model)
        # Long-lived objects (TensorFlow, MLflow, the model) out of the collector's sight: no 300 ms pauses.
        gc.collect()
        gc.freeze()
        log.info("serving %s version %s%s", model.name, model.version, f" (was {previous.version})" if previous else "")
        return True
