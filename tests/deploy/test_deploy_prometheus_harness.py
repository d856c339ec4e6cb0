"""Self-test of prometheus_harness against a fake exporter, and a live check of every dashboard panel
query and every alert expression through a real Prometheus."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from deploy_support import ALERTS_PATH, DASHBOARD_PATH, require_tool
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_harness import (
    PrometheusHarness,
    PrometheusQueryError,
    alert_exprs,
    dashboard_exprs,
    free_port,
    substitute_grafana_variables,
)

from services.api.drift import DriftMonitor
from services.api.metrics import ApiMetrics
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import Reference


def _fake_api_registry(version: str) -> CollectorRegistry:
    """The API's own metric objects (``ApiMetrics``, ``DriftMonitor``: the contract), fed made-up values, plus
    the instrumentator's http_* series."""
    metrics = ApiMetrics()
    registry = metrics.registry
    requests = Counter("http_requests_total", "Requests", ["handler", "method", "status"], registry=registry)
    duration = Histogram("http_request_duration_seconds", "Latency", ["handler", "method"], registry=registry)
    for handler, method in (("/predict", "POST"), ("/invocations", "POST"), ("/model", "GET")):
        requests.labels(handler, method, "2xx").inc(40)
        requests.labels(handler, method, "4xx").inc(2)
        duration.labels(handler, method).observe(0.08)
        duration.labels(handler, method).observe(0.3)
    requests.labels("/predict", "POST", "5xx").inc(1)
    metrics.served(["dandelion", "grass", "grass"], [0.97, 0.88, 0.64], version, [True, True, False])
    metrics.inference_seconds.observe(0.02)
    metrics.model_loaded("dandelion-grass", version, "champion", f"run-{version}")
    metrics.batch_size.observe(4)
    metrics.queue_depth.set(0)
    metrics.log_written.inc(3)
    metrics.log_queue_depth.set(0)
    metrics.log_healthy.set(1)
    metrics.feedback.labels(version=version, outcome="correct").inc(2)
    metrics.feedback.labels(version=version, outcome="wrong").inc()
    metrics.live_accuracy.set(2 / 3)
    metrics.live_accuracy_samples.set(3)
    rng = np.random.default_rng(int(version))
    reference = Reference.build({c: rng.random(100) for c in DESCRIPTOR_COLUMNS})
    drift = DriftMonitor(window=50, min_samples=10)
    drift.set_reference({"drift_reference": reference.to_dict()}, "m")
    for i in range(20):
        descriptors = dict(zip(DESCRIPTOR_COLUMNS, rng.random(len(DESCRIPTOR_COLUMNS)).tolist(), strict=True))
        drift.observe(descriptors, 0.9, in_domain=i % 10 != 0)
    registry.register(drift)
    return registry


@pytest.fixture(scope="module")
def fake_api_targets() -> Iterator[list[str]]:
    servers = []
    targets = []
    try:
        for version in ("3", "4"):
            port = free_port()
            server, thread = start_http_server(port, addr="127.0.0.1", registry=_fake_api_registry(version))
            servers.append((server, thread))
            targets.append(f"127.0.0.1:{port}")
        yield targets
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(fake_api_targets: list[str]) -> Iterator[PrometheusHarness]:
    require_tool("prometheus")
    with PrometheusHarness(fake_api_targets, rule_files=[ALERTS_PATH]) as prom:
        prom.wait_for_scrapes(3)
        yield prom


def test_substitutes_grafana_variables() -> None:
    assert substitute_grafana_variables("rate(x[$__rate_interval])") == "rate(x[1m])"
    assert substitute_grafana_variables("increase(x[${__range}])") == "increase(x[1h])"
    assert substitute_grafana_variables("x[[[__interval]]]") == "x[15s]"
    with pytest.raises(KeyError, match="instance"):
        substitute_grafana_variables('up{instance="$instance"}')


def test_lists_every_dashboard_and_alert_expr() -> None:
    dash = dashboard_exprs(DASHBOARD_PATH)
    alerts = alert_exprs(ALERTS_PATH)
    assert len(dash) >= 10
    assert len(alerts) >= 5
    assert not [expr for _, expr in dash if "$" in expr], "Grafana variables left after substitution"
    assert {name for name, _ in alerts} >= {
        "ApiHighErrorRate",
        "ApiHighLatencyP95",
        "ApiNoReadyReplica",
        "ModelLoadFailures",
        "ModelConfidenceCollapse",
    }


def test_harness_scrapes_both_targets(prometheus: PrometheusHarness, fake_api_targets: list[str]) -> None:
    up = prometheus.query('up{job="api"}')
    assert sorted(s["metric"]["instance"] for s in up) == sorted(fake_api_targets)
    assert prometheus.query('sum(up{job="api"})')[0]["value"][1] == "2"
    versions = {s["metric"]["version"] for s in prometheus.query("model_info")}
    assert versions == {"3", "4"}


def test_harness_reports_query_errors(prometheus: PrometheusHarness) -> None:
    with pytest.raises(PrometheusQueryError, match="bad_data"):
        prometheus.query("sum(rate(http_requests_total[5m])")
    with pytest.raises(PrometheusQueryError):
        prometheus.query("no_such_function(up)")


def test_every_dashboard_query_runs_and_returns_data(prometheus: PrometheusHarness) -> None:
    failures = []
    for where, expr in dashboard_exprs(DASHBOARD_PATH):
        try:
            result = prometheus.query(expr)
        except PrometheusQueryError as err:
            failures.append(f"{where}: {err}")
            continue
        if not result:
            failures.append(f"{where}: no data for {expr}")
    assert not failures, "\n".join(failures)


def test_every_alert_expression_parses(prometheus: PrometheusHarness) -> None:
    failures = []
    for name, expr in alert_exprs(ALERTS_PATH):
        try:
            prometheus.query(expr)
        except PrometheusQueryError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)


def test_alert_rules_evaluate_without_error(prometheus: PrometheusHarness) -> None:
    expected = {name for name, _ in alert_exprs(ALERTS_PATH)}
    deadline = time.monotonic() + 20
    rules = prometheus.rules()
    while time.monotonic() < deadline and any(r["health"] == "unknown" for r in rules):
        time.sleep(0.5)
        rules = prometheus.rules()
    assert {r["name"] for r in rules} == expected
    bad = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"]
    assert not bad, "\n".join(bad)
    # The fake replicas are ready and error-free: none of these may fire.
    firing = {r["name"] for r in rules if r.get("state") == "firing"}
    assert not firing & {"ApiNoReadyReplica", "ApiReplicaDown", "ModelLoadFailures"}
