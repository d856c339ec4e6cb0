"""Model and batching metrics, in the app's own registry beside prometheus-fastapi-instrumentator's."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)

from shared.feedback import DOMAIN_OUTCOMES

HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, prediction_log: bool = True) -> None:
        """``prediction_log=False``: the log's and feedback's series are not exported (no alert on a log that is
        off by choice)."""
        self.registry = registry or CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.predictions = Counter(
            "model_predictions", "Predictions served, by predicted label.", ["label"], registry=r
        )
        self.confidence = Histogram(
            "model_prediction_confidence",
            "Probability of the predicted class.",
            buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.inference_seconds = Histogram(
            "model_inference_seconds",
            "Duration of one forward pass of the model (a whole batch), excluding decoding and queueing.",
            buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.info = Gauge(
            "model_info", "The model being served (value 1).", ["name", "version", "alias", "run_id"], registry=r
        )
        self.ready = Gauge("model_ready", "1 when a model is loaded and can predict.", registry=r)
        self.out_of_domain = Counter(
            "model_out_of_domain",
            "Inputs the served version found unlike its training photos (in-domain distance above its threshold).",
            ["version"],
            registry=r,
        )
        self.load_failures = Counter(
            "model_load_failures", "Failed attempts to resolve or load a model from the registry.", registry=r
        )
        self.reloads = Counter("model_reloads", "Models loaded and swapped in (the first load included).", registry=r)
        self.batch_size = Histogram(
            "model_batch_size",
            "Images per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("model_batch_queue_depth", "Images waiting for a forward pass.", registry=r)

        # The prediction log (services/api/predlog.py) and feedback: created either way, exported only when on.
        r = self.registry if prediction_log else None
        self.log_written = Counter(
            "prediction_log_written", "Predictions written to the predictions table.", registry=r
        )
        self.log_dropped = Counter(
            "prediction_log_dropped",
            "Predictions not logged, by reason: queue_full (overload, or a database outage outlasting the queue), "
            "rejected (rows the database refused), shutdown (not written before the process stopped).",
            ["reason"],
            registry=r,
        )
        self.uploads_dropped = Counter(
            "prediction_log_uploads_dropped",
            "Uploaded files not stored (API_STORE_UPLOADS on): over the queue's byte budget, the store failed, or "
            "over the client's or the replica's hourly quota.",
            ["reason"],
            registry=r,
        )
        self.log_queue_depth = Gauge("prediction_log_queue_depth", "Predictions waiting to be written.", registry=r)
        self.log_healthy = Gauge(
            "prediction_log_healthy", "1 while the prediction log's last database operation succeeded.", registry=r
        )
        self.feedback = Counter(
            "model_feedback",
            "Feedback received (first label per prediction), by whether the served prediction was right: correct, "
            "wrong, or neither (the photo is neither a dandelion nor grass: no verdict on the two-class answer).",
            ["version", "outcome"],
            registry=r,
        )
        self.domain_feedback = Counter(
            "model_domain_feedback",
            "Feedback on answers with an in-domain verdict, by what it says about that verdict: "
            "confirmed_out_of_domain (neither, on a flagged answer), missed_out_of_domain (neither, on an answer in "
            "domain), wrongly_flagged (dandelion or grass, on a flagged answer), confirmed_in_domain.",
            ["version", "outcome"],
            registry=r,
        )
        self.live_accuracy = Gauge(
            "model_live_accuracy",
            "Accuracy of the served model version over its predictions with a dandelion or grass label as feedback "
            "(from the database; neither labels are counted by model_live_domain_feedback).",
            registry=r,
        )
        self.live_accuracy_samples = Gauge(
            "model_live_accuracy_samples",
            "Predictions of the served version that have dandelion or grass feedback.",
            registry=r,
        )
        self.live_domain_feedback = Gauge(
            "model_live_domain_feedback",
            "Predictions of the served version with feedback, by what the feedback says about the in-domain verdict "
            "(from the database; outcomes as in model_domain_feedback).",
            ["outcome"],
            registry=r,
        )
        self.live_accuracy_clients = Gauge(
            "model_live_accuracy_clients",
            "Distinct clients (addresses) that sent the feedback behind model_live_accuracy; +Inf once any label "
            "came with the feedback token (trusted). LiveAccuracyLow needs 3, so one client cannot fire it.",
            registry=r,
        )
        self.live_accuracy.set(float("nan"))  # unknown until computed, not 0
        for outcome in DOMAIN_OUTCOMES:
            self.live_domain_feedback.labels(outcome=outcome).set(0)

        for reason in ("queue_full", "rejected", "shutdown"):
            self.log_dropped.labels(reason=reason)  # exported as 0 from the start, not only after a first drop
        for reason in ("queue_full", "store_error", "quota"):
            self.uploads_dropped.labels(reason=reason)

    def served(
        self,
        labels: Sequence[str],
        confidences: Sequence[float],
        version: str | None = None,
        in_domain: Sequence[bool] | None = None,
    ) -> None:
        for label, confidence in zip(labels, confidences, strict=True):
            self.predictions.labels(label=label).inc()
            self.confidence.observe(confidence)
        if in_domain is not None and version is not None:
            outside = sum(1 for flag in in_domain if not flag)
            self.out_of_domain.labels(version=version).inc(outside)  # 0 too: the series exists from the start

    def model_loaded(self, name: str, version: str, alias: str, run_id: str) -> None:
        self.info.clear()
        self.info.labels(name=name, version=version, alias=alias, run_id=run_id).set(1)
        self.ready.set(1)
        self.reloads.inc()
