"""The loaded model and its lifecycle: load at start with backoff, poll the alias, swap atomically.

A :class:`LoadedModel` is immutable; the runtime replaces its reference in one assignment, so a batch
that took the old model finishes on the old model and every response names the version it used.
Where models come from is :mod:`services.api.registry`; how they run, :mod:`services.api.forward` (the
trainer's LiteRT export on the LiteRT interpreter, without TensorFlow in the process, by default).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import numpy as np

from services.api.metrics import ApiMetrics
from shared.images import MODEL_SIZE

log = logging.getLogger(__name__)

LITERT_FILE = "model.tflite"
"""The trainer's LiteRT export, logged with the model as an MLflow extra file (same name as in the trainer)."""
Runtime = Literal["auto", "litert", "tensorflow"]


@dataclass(frozen=True)
class Outputs:
    """Where the answers beyond the probabilities are in a forward pass's row (the trainer's LiteRT export)."""

    distance: int
    """The in-domain distance."""
    neither: int | None = None
    """P(neither): the share of the kinds of photo the model learnt to refuse."""
    explain: int | None = None
    """First column of the class activation map (``grid`` x ``grid`` cells, row-major)."""
    grid: int = 0


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
    domain_threshold: float | None = None
    """When set, ``forward`` returns more columns (the trainer's LiteRT export does: see ``outputs``), and inputs
    farther than this are "neither dandelion nor grass". None: no in-domain score."""
    outputs: Outputs | None = None
    """Where the in-domain distance, P(neither) and the activation map are; None with ``domain_threshold`` set
    means the one column right after the probabilities (versions before P(neither))."""
    neither_threshold: float | None = None
    """P(neither) above which an input is out of domain (it looks like a kind of photo the model refuses)."""
    refused_kinds: tuple[str, ...] = ()
    low_confidence_threshold: float | None = None
    """The version's own "not sure" point, read off its calibrated reliability curve (None: the API's setting)."""
    card: str | None = field(default=None, repr=False)
    """The version's ``model_card.md``, when its run has one."""

    @property
    def distance_column(self) -> int | None:
        if self.domain_threshold is None:
            return None
        return self.outputs.distance if self.outputs is not None else len(self.labels)

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
            "in_domain_threshold": self.domain_threshold,
            "neither_threshold": self.neither_threshold,
            "refused_kinds": list(self.refused_kinds),
            "low_confidence_threshold": self.low_confidence_threshold,
            "explains": self.outputs is not None and self.outputs.explain is not None,
            "card": self.card is not None,
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
        no_model_retry_s: float = 5.0,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.no_model_retry_s = no_model_retry_s
        """The longest wait while the registry answers that nothing is registered yet: the trainer is still at
        work (a stack's first start), and asking again costs the registry one small request."""
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
                    wait = min(delay, self.no_model_retry_s) if self.last_error_kind == "no_model_registered" else delay
                    log.warning(
                        "model refresh failed (%s); %s",
                        self._explain(exc),
                        "keeping the current model" if self.current else f"retrying in {wait:.1f} s",
                    )
                    if self.current is None:
                        await asyncio.sleep(wait)
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
