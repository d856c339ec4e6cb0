"""Prometheus configuration and alert rules: promtool checks, rule unit tests and the issue's contract."""

from __future__ import annotations

from deploy_support import ALERTS_PATH, PROMETHEUS_DIR, load_yaml, require_tool, run_tool


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    out = run_tool([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    out = run_tool([promtool, "check", "rules", str(ALERTS_PATH)])
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_rule_unit_tests() -> None:
    promtool = require_tool("promtool")
    out = run_tool([promtool, "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out.stdout + out.stderr


def test_compose_prometheus_scrapes_both_api_replicas() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (api_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "api"]
    targets = {t for static in api_job["static_configs"] for t in static["targets"]}
    assert targets == {"api:8000", "api-2:8000"}
    assert api_job.get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_cover_the_issue() -> None:
    rules = {rule["alert"]: rule for group in load_yaml(ALERTS_PATH)["groups"] for rule in group["rules"]}
    assert 'status="5xx"' in rules["ApiHighErrorRate"]["expr"]
    assert "histogram_quantile(0.95" in rules["ApiHighLatencyP95"]["expr"]
    assert "http_request_duration_seconds_bucket" in rules["ApiHighLatencyP95"]["expr"]
    no_ready = rules["ApiNoReadyReplica"]["expr"]
    assert "sum(model_ready) < 1" in no_ready
    assert "absent(model_ready)" in no_ready
    assert "model_load_failures_total" in rules["ModelLoadFailures"]["expr"]
    assert "model_prediction_confidence_bucket" in rules["ModelConfidenceCollapse"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


def test_every_alert_has_a_unit_case_that_fires_and_one_that_does_not() -> None:
    """A rule whose threshold or comparison is wrong fails ``promtool test rules`` only if a case expects it to
    fire (too lenient) and another expects silence (too eager): each alert needs both."""
    alerts = {rule["alert"] for group in load_yaml(ALERTS_PATH)["groups"] for rule in group["rules"]}
    tests = load_yaml(PROMETHEUS_DIR / "alerts.test.yml")["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - fires == set(), "alerts without a case that fires"
    assert alerts - silent == set(), "alerts without a case that stays silent"
    assert (fires | silent) - alerts == set(), "cases for alerts that do not exist"
