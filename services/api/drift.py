"""Input drift of live traffic, as Prometheus gauges computed at scrape time.

The last ``window`` inputs' descriptors (:mod:`shared.descriptors`) and confidences sit in a ring buffer;
each scrape of ``/metrics`` scores them against the served model's reference (its training split, shipped in
the model's metadata by the trainer) with :mod:`shared.drift`, the same PSI the trainer's ``drift`` report and
``run --if-needed`` compute. Until ``min_samples`` inputs have been seen, no drift value is exported (a
handful of photos says nothing), so an alert cannot fire on a fresh replica.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import Reference

log = logging.getLogger(__name__)


class DriftMonitor(Collector):
    def __init__(self, window: int = 500, min_samples: int = 100, low_confidence: float = 0.7) -> None:
        self.window = window
        self.min_samples = min(min_samples, window)
        self.low_confidence = low_confidence
        self._rows = np.zeros((window, len(DESCRIPTOR_COLUMNS)), np.float64)
        self._confidence = np.zeros(window, np.float64)
        self._outside = np.full(window, np.nan)
        """1.0 out of domain, 0.0 in, NaN when the model that answered has no in-domain score."""
        self._count = 0
        self._lock = threading.Lock()
        self.reference: Reference | None = None
        self.reference_source = ""

    def set_reference(self, metadata: Mapping[str, object], model: str) -> None:
        """Take the reference from a model's metadata; without one, drift is not exported (and logged once)."""
        spec = metadata.get("drift_reference")
        try:
            self.reference = Reference.from_dict(spec) if isinstance(spec, Mapping) else None
        except ValueError as exc:
            log.warning("%s: unusable drift reference (%s); input drift is not monitored", model, exc)
            self.reference = None
            return
        if self.reference is None:
            log.warning("%s carries no drift reference (trained before drift monitoring): drift not monitored", model)
        else:
            self.reference_source = self.reference.source

    def observe(self, descriptors: Mapping[str, float], confidence: float, in_domain: bool | None = None) -> None:
        row = [descriptors[name] for name in DESCRIPTOR_COLUMNS]
        with self._lock:
            slot = self._count % self.window
            self._rows[slot] = row
            self._confidence[slot] = confidence
            self._outside[slot] = np.nan if in_domain is None else float(not in_domain)
            self._count += 1

    def out_of_domain_share(self) -> tuple[float, int]:
        """Share of the window's scored inputs that were out of domain, and how many were scored."""
        with self._lock:
            outside = self._outside[: min(self._count, self.window)]
            scored = outside[~np.isnan(outside)]
        return (float(scored.mean()) if len(scored) else float("nan")), len(scored)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's descriptor rows and confidences (oldest first is not guaranteed; order is irrelevant)."""
        with self._lock:
            n = min(self._count, self.window)
            return self._rows[:n].copy(), self._confidence[:n].copy()

    def scores(self) -> dict[str, float] | None:
        rows, _ = self.snapshot()
        if self.reference is None or len(rows) < self.min_samples:
            return None
        return self.reference.psi(rows)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows, confidence = self.snapshot()
        samples = GaugeMetricFamily(
            "model_drift_window_samples", "Recent inputs in the drift window (drift is exported from min_samples on)."
        )
        samples.add_metric([], float(len(rows)))
        yield samples
        share = GaugeMetricFamily(
            "model_low_confidence_share",
            f"Share of the drift window's predictions whose confidence is below {self.low_confidence:g}.",
        )
        if len(confidence):
            share.add_metric([], float(np.mean(confidence < self.low_confidence)))
        yield share
        outside, scored = self.out_of_domain_share()
        domain = GaugeMetricFamily(
            "model_out_of_domain_share",
            "Share of the drift window's inputs that the model found unlike its training photos (scored ones).",
        )
        if scored:
            domain.add_metric([], outside)
        yield domain
        psi = GaugeMetricFamily(
            "model_input_drift_psi",
            "Population stability index of each input descriptor: the drift window against the served model's "
            "training split (0.1-0.25 moderate, above 0.25 significant).",
            labels=["feature"],
        )
        reference = self.reference
        if reference is not None and len(rows) >= self.min_samples:
            for name, value in reference.psi(rows).items():
                psi.add_metric([name], value)
        yield psi
