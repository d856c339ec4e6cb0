"""Where the API's models come from: the MLflow registry, read over its REST API when it can be.

Against an MLflow tracking server over plain HTTP(S), the alias, the MLmodel file and the LiteRT file are
read through MLflow's REST API (:class:`RestRegistry`), so ``import mlflow`` (~3 s and ~200 MB) is not
paid; any other registry, or a version to run on TensorFlow, goes through MLflow's client.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.api.forward import compile_forward, litert_forward
from services.api.runtime import LITERT_FILE, LoadedModel, Outputs, Runtime
from shared.db import sqlite_file
from shared.labels import LABELS
from shared.settings import RegistrySettings

CARD_FILE = "model_card.md"
"""Every run's model card (``services.trainer.modelcard``), at the root of its artifacts."""


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

    def run_artifact_uri(self, run_id: str) -> str:
        import orjson

        return orjson.loads(self._get("/api/2.0/mlflow/runs/get", run_id=run_id))["run"]["info"]["artifact_uri"]

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
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one log line per load is enough
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
        if (database := sqlite_file(self.settings.tracking_uri)) is not None and not database.exists():
            # MLflow's client would create an empty database here (and its folder) and then look in it.
            raise RegistryError(
                f"RESOURCE_DOES_NOT_EXIST: no MLflow database at {database.resolve()} (relative paths start in "
                f"{Path.cwd()}); start the API where the trainer ran, or set MLFLOW_TRACKING_URI"
            )
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
        forward = litert_forward(flatbuffer, self.threads)
        return self._model(version, run_id, forward, "litert", meta.get("metadata"), self._card_over_rest(rest, run_id))

    @staticmethod
    def _card_over_rest(rest: RestRegistry, run_id: str) -> str | None:
        """The run's model card; None when it has none (older versions) or it cannot be read now."""
        try:
            card = rest.fetch(rest.run_artifact_uri(run_id), CARD_FILE)
        except Exception:  # a missing card never stops a model from being served
            return None
        return card.decode("utf-8", "replace") if card is not None else None

    def _load_with_mlflow(self, version: str, run_id: str) -> LoadedModel:
        import mlflow
        import yaml
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        uri = f"models:/{self.settings.model_name}/{version}"
        tracking_uri = self.settings.tracking_uri
        mlflow.set_tracking_uri(tracking_uri)  # artifact repositories proxied by the server read it
        repo = ModelsArtifactRepository(uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="model-") as tmp:
            # MLmodel first: with a LiteRT export, that one file is all that is downloaded besides it.
            # Read as YAML, not with mlflow.models.Model: that one imports pandas, which the API image leaves out.
            meta = yaml.safe_load(Path(repo.download_artifacts("MLmodel", dst_path=tmp)).read_text())
            litert = litert_path(meta.get("flavors") or {}) if self.runtime != "tensorflow" else None
            if litert is not None:
                flatbuffer = Path(repo.download_artifacts(litert, dst_path=tmp)).read_bytes()
                forward, runtime = litert_forward(flatbuffer, self.threads), "litert"
            elif self.runtime == "litert":
                raise _no_export(version)
            else:
                _require_tensorflow(version, self.runtime)
                import mlflow.tensorflow

                path = mlflow.artifacts.download_artifacts(uri, dst_path=f"{tmp}/all", tracking_uri=tracking_uri)
                forward, runtime = compile_forward(mlflow.tensorflow.load_model(path)), "tensorflow"
            card = None
            try:
                card_path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=CARD_FILE, dst_path=f"{tmp}/card", tracking_uri=tracking_uri
                )
                card = Path(card_path).read_text(errors="replace")
            except Exception:  # a missing card never stops a model from being served
                card = None
        return self._model(version, run_id, forward, runtime, meta.get("metadata"), card)

    def _model(
        self,
        version: str,
        run_id: str,
        forward: Callable[[np.ndarray], np.ndarray],
        runtime: str,
        metadata,
        card: str | None = None,
    ) -> LoadedModel:
        metadata = dict(metadata or {})
        domain = metadata.get("in_domain")
        threshold = neither = outputs = None
        columns = len(metadata.get("labels", LABELS))
        if runtime == "litert" and isinstance(domain, dict) and domain.get("score_column") == columns:
            threshold = float(domain["threshold"])  # only the LiteRT export computes the distance
            outputs = _outputs(metadata.get("outputs"))
            if outputs is not None and outputs.neither is not None and domain.get("neither_threshold") is not None:
                neither = float(domain["neither_threshold"])
        low = metadata.get("low_confidence_threshold")
        return LoadedModel(
            name=self.settings.model_name,
            version=version,
            alias=self.settings.model_alias,
            run_id=run_id,
            labels=tuple(metadata.get("labels", LABELS)),
            forward=forward,
            metadata=metadata,
            runtime=runtime,
            domain_threshold=threshold,
            outputs=outputs,
            neither_threshold=neither,
            refused_kinds=tuple((domain or {}).get("refused_kinds") or ()) if neither is not None else (),
            low_confidence_threshold=float(low) if isinstance(low, int | float) else None,
            card=card,
        )


def _outputs(spec: Any) -> Outputs | None:
    """The export's column layout from the model metadata (``services.trainer.export.outputs``)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("domain_distance"), int):
        return None
    explain = spec.get("explain") if isinstance(spec.get("explain"), dict) else {}
    grid = explain.get("grid") or [0]
    return Outputs(
        distance=spec["domain_distance"],
        neither=spec.get("neither") if isinstance(spec.get("neither"), int) else None,
        explain=explain.get("start") if isinstance(explain.get("start"), int) else None,
        grid=int(grid[0]) if grid else 0,
    )


def _no_export(version: str) -> RuntimeError:
    return RuntimeError(f"version {version} has no LiteRT export ({LITERT_FILE}) and API_RUNTIME is 'litert'")


def _require_tensorflow(version: str, runtime: Runtime) -> None:
    """A version without the LiteRT export (or API_RUNTIME=tensorflow) needs TensorFlow, which the API image
    does not carry."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        return
    why = "API_RUNTIME is 'tensorflow'" if runtime == "tensorflow" else f"it has no LiteRT export ({LITERT_FILE})"
    raise RuntimeError(
        f"version {version} needs TensorFlow ({why}) and TensorFlow is not installed here (the API image serves "
        "LiteRT exports only): register a new version with this project's trainer, which exports one, or run the "
        "API where TensorFlow is installed (pip install -c constraints.txt '.[api,trainer]')"
    )


def litert_path(flavors: dict[str, Any]) -> str | None:
    """Where the LiteRT export is inside the logged model (``extra_files/model.tflite``), if it has one."""
    for flavor in flavors.values():
        for extra in flavor.get("extra_files") or ():
            path = extra.get("path", "") if isinstance(extra, dict) else str(extra)
            if path.rsplit("/", 1)[-1] == LITERT_FILE:
                return path
    return None
