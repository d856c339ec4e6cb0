"""Dockerfiles (hadolint plus the issue's rules) and .dockerignore."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import REPO_ROOT, require_tool, run_tool

APP_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = REPO_ROOT / "docker" / "mlflow" / "Dockerfile"


def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions of each stage (continuation lines joined, comments dropped), by stage name."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2) or match.group(1), [])
        if current is not None:
            current.append(line)
    return stages


@pytest.mark.parametrize("dockerfile", [APP_DOCKERFILE, MLFLOW_DOCKERFILE], ids=["app", "mlflow"])
def test_hadolint(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    run_tool([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)])


def _final_stage_rules(stages: dict[str, list[str]], final: str, chain: list[str]) -> None:
    lines = [line for name in chain for line in stages[name]]
    text = "\n".join(lines)
    users = [line.split()[1] for line in stages[final] if line.upper().startswith("USER ")]
    assert users, f"{final}: no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{final}: must run as non-root"
    assert "build-essential" not in text, f"{final}: build tools in the final image"
    assert "gcc" not in text, f"{final}: build tools in the final image"
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=", text), f"{final}: credential in image"
    assert any(line.startswith("COPY --from=") and "/opt/venv" in line for line in stages[final]), final


def test_app_dockerfile() -> None:
    stages = _stages(APP_DOCKERFILE)
    assert set(stages) >= {"base", "build-api", "build-trainer", "runtime", "api", "trainer"}
    assert "FROM ${PYTHON_IMAGE} AS base" in stages["base"][0]
    assert "python:3.11-slim" in APP_DOCKERFILE.read_text(encoding="utf-8").split("ARG PYTHON_IMAGE=")[1].split()[0]
    build_api = "\n".join(stages["build-api"])
    build_trainer = "\n".join(stages["build-trainer"])
    assert '-c constraints.txt ".[api]"' in build_api
    assert "trainer" not in build_api
    assert '-c constraints.txt ".[trainer]"' in build_trainer
    for final in ("api", "trainer"):
        _final_stage_rules(stages, final, ["base", "runtime", final])
    api = "\n".join(stages["api"])
    assert "COPY --from=build-api /opt/venv /opt/venv" in api
    assert "HEALTHCHECK" in api
    assert "/health/live" in api
    assert "urllib.request" in api
    assert "EXPOSE 8000" in api
    # One source of truth for the port: API_PORT, for the server and for its health check alike.
    assert 'CMD ["python", "-m", "services.api"]' in api and "--port" not in api
    assert "API_PORT=8000" in api and "os.environ.get('API_PORT', '8000')" in api
    trainer = "\n".join(stages["trainer"])
    assert "COPY --from=build-trainer /opt/venv /opt/venv" in trainer
    assert 'ENTRYPOINT ["python", "-m", "services.trainer"]' in trainer
    assert 'CMD ["run"]' in trainer
    assert "GIT_PYTHON_REFRESH=quiet" in trainer  # no git in the image: MLflow's GitPython stays quiet
    text = APP_DOCKERFILE.read_text(encoding="utf-8")
    # A BuildKit frontend from Docker Hub would make every build without a registry fail; uid 10001 is not a
    # system uid (useradd --system warned).
    assert "# syntax=" not in text and "--system" not in text


def test_mlflow_dockerfile() -> None:
    stages = _stages(MLFLOW_DOCKERFILE)
    text = MLFLOW_DOCKERFILE.read_text(encoding="utf-8")
    assert "python:3.11-slim" in text
    for pin in ('"mlflow==3.17.2"', '"pymysql==1.2.4"', '"boto3==1.40.61"'):
        assert pin in text
    _final_stage_rules(stages, "runtime", ["base", "runtime"])
    runtime = "\n".join(stages["runtime"])
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in runtime
    assert "HEALTHCHECK" in runtime
    assert ":5000/health" in runtime
    assert '"mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"' in runtime


def test_dockerignore() -> None:
    entries = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert entries >= {".git", "var", ".venv", "*.db", "data", ".env", "tests", ".pytest_cache", "**/__pycache__"}
    # Files the image build copies must not be excluded.
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "shared", "services"):
        assert needed not in entries, needed


def test_mysql_init_script_is_valid_bash() -> None:
    for script in sorted((REPO_ROOT / "docker" / "mysql" / "initdb").glob("*.sh")):
        run_tool(["bash", "-n", str(script)])


def _requirements(*extras: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "requirements.py"), str(REPO_ROOT / "pyproject.toml"), *extras],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_the_images_install_the_dependencies_before_the_source() -> None:
    stages = _stages(APP_DOCKERFILE)
    for target in ("api", "trainer"):
        lines = stages[f"build-{target}"]
        install = next(i for i, line in enumerate(lines) if f"requirements.py pyproject.toml {target}" in line)
        first_source = next(i for i, line in enumerate(lines) if line.startswith(("COPY shared", "COPY services")))
        assert install < first_source, target
        assert any("--no-deps" in line for line in lines[first_source:]), target
    # Nothing but the dependency list and its pins comes before that layer in the shared build stage.
    copies = [line for line in stages["build-base"] if line.startswith("COPY")]
    assert copies == ["COPY pyproject.toml constraints.txt docker/requirements.py ./"]


def test_the_serving_requirements_leave_tensorflow_and_the_mlflow_server_out() -> None:
    api = {re.split(r"[<>=\[ ]", line)[0].lower() for line in _requirements("api")}
    trainer = {re.split(r"[<>=\[ ]", line)[0].lower() for line in _requirements("trainer")}
    dev = {re.split(r"[<>=\[ ]", line)[0].lower() for line in _requirements("dev")}
    assert {"ai-edge-litert", "fastapi", "mlflow-skinny"} <= api
    assert not api & {"tensorflow", "tensorflow-cpu", "mlflow", "pyarrow", "pandas", "scikit-learn"}
    assert {"tensorflow-cpu", "mlflow", "pyarrow"} <= trainer
    assert api | trainer <= dev and "dandelion-grass" not in dev  # the project's own extras, expanded
