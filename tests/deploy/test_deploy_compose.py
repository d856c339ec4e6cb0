"""compose.yaml: valid for docker-compose 1.29 with .env.example, whole stack wired as the issue asks,
and no default for any credential."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import REPO_ROOT, require_tool, run_tool

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
CREDENTIALS = (
    "MYSQL_ROOT_PASSWORD",
    "MYSQL_USER",
    "MYSQL_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "GRAFANA_ADMIN_USER",
    "GRAFANA_ADMIN_PASSWORD",
)


def _clean_env() -> dict[str, str]:
    """Only PATH/HOME/LANG: a variable exported in the caller's shell must not leak into interpolation."""
    return {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "LC_ALL"}}


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose")
    return subprocess.run(
        [tool, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        cwd=REPO_ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _bind_mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Host folder -> container path of a service's bind mounts (long or short syntax)."""
    mounts: dict[Path, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[Path(volume["source"])] = volume["target"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith(("/", ".")):
            mounts[Path(source)] = target
    return mounts


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    tool = require_tool("docker-compose")
    out = run_tool(
        [
            tool,
            "--project-directory",
            str(REPO_ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(ENV_EXAMPLE),
            "config",
        ],
        env=_clean_env(),
    )
    return yaml.safe_load(out.stdout)


def test_config_is_valid_with_env_example() -> None:
    proc = _compose(ENV_EXAMPLE, "config", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"docker-compose warned: {proc.stderr}"


@pytest.mark.parametrize("variable", CREDENTIALS)
def test_credentials_have_no_default(variable: str, tmp_path: Path) -> None:
    lines = [
        line for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines() if not line.startswith(f"{variable}=")
    ]
    env_file = tmp_path / "env"
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = _compose(env_file, "config", "-q")
    assert proc.returncode != 0, f"compose.yaml starts without {variable}"
    assert f"set {variable} in .env" in proc.stderr


def test_env_example_holds_placeholders_only() -> None:
    values = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert set(CREDENTIALS) <= set(values)
    for name in CREDENTIALS:
        if "PASSWORD" in name or "SECRET" in name:
            assert "change-me" in values[name], f"{name} must be an obvious placeholder"
    assert len(values["AWS_SECRET_ACCESS_KEY"]) >= 8
    assert len(values["MINIO_ROOT_PASSWORD"]) >= 8
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split()


def test_services_and_healthchecks(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {
        "mysql",
        "minio",
        "minio-init",
        "mlflow",
        "trainer",
        "api",
        "api-2",
        "prometheus",
        "grafana",
    }
    for name in ("mysql", "minio", "mlflow", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    assert services["mysql"]["image"].startswith("mysql:8")
    # The API replicas use their image's HEALTHCHECK, which reads API_PORT (tests/deploy/test_deploy_docker.py):
    # an override here would fix a port again.
    assert "healthcheck" not in services["api"] and "healthcheck" not in services["api-2"]
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_start_order(resolved: dict[str, Any]) -> None:
    services = resolved["services"]

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("minio-init") == {"minio": "service_healthy"}
    assert conditions("mlflow") == {"mysql": "service_healthy", "minio-init": "service_completed_successfully"}
    for name in ("trainer", "api", "api-2"):
        assert conditions(name) == {
            "mysql": "service_healthy",
            "minio-init": "service_completed_successfully",
            "mlflow": "service_healthy",
        }, name
    assert conditions("grafana") == {"prometheus": "service_healthy"}


def test_bucket_creation(resolved: dict[str, Any]) -> None:
    init = resolved["services"]["minio-init"]
    assert init["image"].startswith("minio/mc:")
    script = " ".join(init["command"])
    assert "local/dandelion" in script
    assert "local/mlflow" in script
    assert init["restart"] == "no"


def test_mysql_init_creates_both_databases(resolved: dict[str, Any]) -> None:
    mounts = _bind_mounts(resolved["services"]["mysql"])
    (init_dir,) = [source for source, target in mounts.items() if target == "/docker-entrypoint-initdb.d"]
    assert init_dir == REPO_ROOT / "docker" / "mysql" / "initdb"
    script = "".join(p.read_text(encoding="utf-8") for p in sorted(init_dir.iterdir()))
    assert "CREATE DATABASE IF NOT EXISTS \\`dandelion\\`" in script
    assert "CREATE DATABASE IF NOT EXISTS \\`mlflow\\`" in script
    for path in init_dir.iterdir():
        if path.suffix == ".sh":
            run_tool(["bash", "-n", str(path)])


def test_application_environment(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in ("trainer", "api", "api-2"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("mysql+asyncmy://")
        assert env["DATABASE_URL"].endswith("@mysql:3306/dandelion")
        assert env["OBJECT_STORE_URL"] == "s3://dandelion/"
        assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["MODEL_NAME"] == "dandelion-grass"
        assert env["MODEL_ALIAS"] == "champion"
    assert services["trainer"]["command"] == ["run"]
    assert services["trainer"]["build"]["target"] == "trainer"
    assert services["trainer"]["restart"] == "no"
    for name in ("api", "api-2"):
        assert services[name]["build"]["target"] == "api"
        assert services[name]["environment"]["API_PORT"] == "8000"
        assert "command" not in services[name], "the image's CMD reads API_PORT: no second port setting"
    for name in ("api", "api-2", "trainer", "mlflow"):  # every build can take a local base image
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == "python:3.11-slim-bookworm", name
    assert "utf8mb4_unicode_ci" in " ".join(services["mysql"]["command"])  # MySQL 8 and MariaDB both know it
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("mysql+pymysql://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@mysql:3306/mlflow")
    assert mlflow_env["MLFLOW_DEFAULT_ARTIFACT_ROOT"] == "s3://mlflow/"
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]


def test_monitoring_mounts(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert _bind_mounts(services["prometheus"])[REPO_ROOT / "monitoring" / "prometheus"] == "/etc/prometheus"
    grafana_sources = _bind_mounts(services["grafana"])
    assert grafana_sources[REPO_ROOT / "monitoring" / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    dashboards_target = grafana_sources[REPO_ROOT / "monitoring" / "grafana" / "dashboards"]
    provider = yaml.safe_load(
        (REPO_ROOT / "monitoring/grafana/provisioning/dashboards/dashboards.yml").read_text(encoding="utf-8")
    )
    assert provider["providers"][0]["options"]["path"] == dashboards_target
