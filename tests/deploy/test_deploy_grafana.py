"""Grafana: provisioning files and the API dashboard's structure (modern panel types, datasource,
ids, layout, and queries that use only the API's contract metrics)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_support import DASHBOARD_PATH, GRAFANA_DIR, load_yaml

ALLOWED_PANEL_TYPES = {
    "timeseries",
    "stat",
    "bargauge",
    "piechart",
    "gauge",
    "table",
    "heatmap",
    "histogram",
    "text",
    "barchart",
    "state-timeline",
    "status-history",
}
LEGACY_PANEL_TYPES = {"graph", "singlestat", "table-old", "grafana-piechart-panel"}
CONTRACT_METRICS = {
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "http_request_duration_seconds_sum",
    "http_request_duration_seconds_count",
    "model_predictions_total",
    "model_prediction_confidence_bucket",
    "model_prediction_confidence_sum",
    "model_prediction_confidence_count",
    "model_inference_seconds_bucket",
    "model_inference_seconds_sum",
    "model_inference_seconds_count",
    "model_info",
    "model_ready",
    "model_load_failures_total",
    "model_reloads_total",
    "model_batch_size_bucket",
    "model_batch_size_sum",
    "model_batch_size_count",
    "model_batch_queue_depth",
    "model_input_drift_psi",
    "model_drift_window_samples",
    "model_low_confidence_share",
    "model_out_of_domain_share",
    "model_out_of_domain_total",
    "model_feedback_total",
    "model_live_accuracy",
    "model_live_accuracy_samples",
    "model_live_domain_feedback",
    "prediction_log_written_total",
    "prediction_log_dropped_total",
    "prediction_log_uploads_dropped_total",
    "prediction_log_queue_depth",
    "prediction_log_healthy",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "up",
}
PROMQL_WORDS = {
    "sum",
    "by",
    "without",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "count",
    "max",
    "min",
    "avg",
    "or",
    "and",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "absent",
    "scalar",
    "vector",
    "bool",
    "topk",
    "bottomk",
    "clamp_min",
    "clamp_max",
    "label_replace",
    "time",
    "le",
    "handler",
    "method",
    "status",
    "label",
    "name",
    "version",
    "alias",
    "run_id",
    "instance",
    "job",
    "delta",
    "deriv",
    "quantile",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop(0)
        found.append(panel)
        stack.extend(panel.get("panels", []))
    return found


def test_provisioning_files_are_valid() -> None:
    datasources = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["uid"] == "prometheus"
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    dashboards = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_dashboard_header(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "dandelion-grass-api"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # provisioned dashboards get their id from Grafana


def test_panels_are_modern_with_unique_ids_and_layout(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] not in LEGACY_PANEL_TYPES, f"legacy panel type {panel['type']}: {panel['title']}"
        assert panel["type"] in ALLOWED_PANEL_TYPES, f"{panel['title']}: {panel['type']}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        grid = panel["gridPos"]
        assert set(grid) >= {"x", "y", "w", "h"}
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{panel['title']} / {target.get('refId')}: no expr"
            assert target.get("datasource", panel["datasource"])["uid"] == "prometheus"


def test_required_panels(dashboard: dict[str, Any]) -> None:
    exprs_by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels(dashboard)}
    types = {p["title"]: p["type"] for p in _panels(dashboard)}
    required = {
        "Request rate by endpoint": "http_requests_total",
        "Error rate by endpoint": 'status="5xx"',
        "Latency p50 / p95 / p99": "http_request_duration_seconds_bucket",
        "Predictions by label": "model_predictions_total",
        "Confidence distribution": "model_prediction_confidence_bucket",
        "Model version served": "model_info",
        "Batch size": "model_batch_size",
        "Replicas up": 'up{job="api"}',
        "Replicas ready": "model_ready",
        "Input drift (PSI) by feature": "model_input_drift_psi",
        "Low-confidence share": "model_low_confidence_share",
        "Out-of-domain share": "model_out_of_domain_share",
        "Out-of-domain inputs by version": "model_out_of_domain_total",
        "Live accuracy (feedback)": "model_live_accuracy",
        "Feedback on the in-domain verdict": "model_live_domain_feedback",
        "Prediction log: written / dropped": "prediction_log_dropped_total",
    }
    for title, needle in required.items():
        assert title in exprs_by_title, f"missing panel {title!r}"
        assert needle in exprs_by_title[title], title
    latency = exprs_by_title["Latency p50 / p95 / p99"]
    assert all(f"histogram_quantile({q}," in latency for q in ("0.5", "0.95", "0.99"))
    assert {"timeseries", "stat", "bargauge", "piechart"} <= set(types.values())


def test_queries_use_only_contract_metrics(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = re.sub(r'"[^"]*"', '""', target["expr"])  # drop label values
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # drop range selectors
            expr = re.sub(r"\{[^}]*\}", "", expr)  # drop matchers
            expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
            expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", r"\1", expr)  # grouping labels
            identifiers = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
            unknown = identifiers - CONTRACT_METRICS - PROMQL_WORDS
            assert not unknown, f"{panel['title']}: not a contract metric: {sorted(unknown)}"
