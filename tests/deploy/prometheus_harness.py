"""Run a real Prometheus against given scrape targets and query it: for dashboard and alert checks.

Usage::

    from prometheus_harness import PrometheusHarness, dashboard_exprs, alert_exprs

    with PrometheusHarness(["127.0.0.1:8000", "127.0.0.1:8001"]) as prom:
        prom.wait_for_scrapes(3)
        for panel, expr in dashboard_exprs():
            result = prom.query(expr)          # raises PrometheusQueryError on a bad expression

The server is ``/usr/bin/prometheus`` (Debian package ``prometheus``; override with ``PROMETHEUS_BIN``),
listening on a free loopback port, scraping every target every second under job ``api``, with its
storage in a temporary folder that is removed on exit. Grafana's variables (``$__rate_interval`` ...)
are replaced by :func:`substitute_grafana_variables` before any query.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DASHBOARD = REPO_ROOT / "monitoring" / "grafana" / "dashboards" / "api.json"
DEFAULT_ALERTS = REPO_ROOT / "monitoring" / "prometheus" / "alerts.yml"
DEFAULT_PROMETHEUS_BIN = "/usr/bin/prometheus"

#: Values given to Grafana's built-in variables when a panel query is sent to Prometheus directly.
GRAFANA_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


class PrometheusError(RuntimeError):
    """The Prometheus server could not be started or did not become ready."""


class PrometheusQueryError(RuntimeError):
    """Prometheus refused a query (bad expression, unknown function, ...)."""

    def __init__(self, expr: str, error_type: str, error: str) -> None:
        super().__init__(f"{error_type}: {error}\n  query: {expr}")
        self.expr = expr
        self.error_type = error_type
        self.error = error


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def substitute_grafana_variables(expr: str, extra: dict[str, str] | None = None) -> str:
    """Replace ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]``; an unknown variable raises KeyError."""
    values = {**GRAFANA_VARIABLES, **(extra or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))  # panels nested in collapsed rows


def dashboard_exprs(path: Path = DEFAULT_DASHBOARD, *, substitute: bool = True) -> list[tuple[str, str]]:
    """``(panel title / refId, expr)`` for every query target of every panel of a dashboard JSON."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                found.append(
                    (
                        f"{panel.get('title')} / {target.get('refId')}",
                        substitute_grafana_variables(expr) if substitute else expr,
                    )
                )
    return found


def alert_exprs(path: Path = DEFAULT_ALERTS) -> list[tuple[str, str]]:
    """``(alert or record name, expr)`` for every rule of a Prometheus rule file."""
    rules = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [
        (rule.get("alert") or rule.get("record"), str(rule["expr"]))
        for group in rules.get("groups", [])
        for rule in group.get("rules", [])
    ]


class PrometheusHarness:
    """A Prometheus process for the duration of a ``with`` block."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job_name: str = "api",
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        binary: str | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.targets = list(targets)
        self.job_name = job_name
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary or os.environ.get("PROMETHEUS_BIN", DEFAULT_PROMETHEUS_BIN)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [{"job_name": self.job_name, "static_configs": [{"targets": self.targets}]}],
        }
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        return config

    def __enter__(self) -> PrometheusHarness:
        if not (Path(self.binary).is_file() or shutil.which(self.binary)):
            raise PrometheusError(
                f"Prometheus binary {self.binary!r} not found: apt-get install -y --no-install-recommends prometheus"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-harness-")
        tmp = Path(self._tmp.name)
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")
        (tmp / "data").mkdir()
        self._log_path = tmp / "prometheus.log"
        self.port = free_port()
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {self.startup_timeout_s} s:\n{self.log()}")

    # -- HTTP API -----------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400/422/503 carry a JSON error body
            body = err.read()
            err.close()
            try:
                return json.loads(body)
            except json.JSONDecodeError:
                raise PrometheusError(f"GET {url} -> {err.code}: {body[:500]!r}") from err

    def query(self, expr: str, *, substitute: bool = True) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list for vectors). Raises PrometheusQueryError."""
        if substitute:
            expr = substitute_grafana_variables(expr)
        payload = self._get("/api/v1/query", {"query": expr})
        if payload.get("status") != "success":
            raise PrometheusQueryError(expr, payload.get("errorType", "?"), payload.get("error", "?"))
        data = payload["data"]
        if data["resultType"] in {"scalar", "string"}:
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets_health(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (with its ``health`` and ``lastError``) from /api/v1/rules."""
        groups = self._get("/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def wait_for_scrapes(self, count: int = 3, timeout_s: float = 30.0) -> None:
        """Wait until every target is up and has been scraped at least ``count`` times."""
        expr = f'min(count_over_time(up{{job="{self.job_name}"}}[5m])) >= {count}'
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            up = self.query(f'up{{job="{self.job_name}"}}')
            if len(up) == len(self.targets) and all(s["value"][1] == "1" for s in up) and self.query(expr):
                return
            time.sleep(0.5)
        raise PrometheusError(
            f"targets not scraped {count} times within {timeout_s} s: {self.targets_health()}\n{self.log()}"
        )
