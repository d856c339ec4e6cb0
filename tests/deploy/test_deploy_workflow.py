"""GitHub Actions workflow: valid against the workflow schema, and lint / tests / images as asked."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_support import REPO_ROOT, load_yaml, require_tool, run_tool

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return load_yaml(WORKFLOW)


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job["steps"]


def test_workflow_schema() -> None:
    tool = require_tool("check-jsonschema")
    run_tool([tool, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)])


def test_lint_job(workflow: dict[str, Any]) -> None:
    runs = " ".join(s.get("run", "") for s in _steps(workflow["jobs"]["lint"]))
    assert "ruff check" in runs
    assert "ruff format --check" in runs


def test_test_job(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["test"]
    assert job["services"]["mysql"]["image"].startswith("mysql:8")
    runs = " ".join(s.get("run", "") for s in _steps(job))
    assert "bash .ci/run" in runs
    assert "minio/minio:" in job["env"]["MINIO_IMAGE"]
    assert "server /data" in runs


def test_image_job_pushes_only_from_main(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["images"]
    assert set(job["needs"]) == {"lint", "test"}
    assert job["permissions"]["packages"] == "write"
    targets = {entry["image"]: entry.get("target") for entry in job["strategy"]["matrix"]["include"]}
    assert targets == {
        "dandelion-grass-api": "api",
        "dandelion-grass-trainer": "trainer",
        "dandelion-grass-mlflow": "runtime",
    }
    assert job["env"]["PUSH"] == "${{ github.event_name == 'push' && github.ref == 'refs/heads/main' }}"
    steps = {s.get("uses", "").split("@")[0]: s for s in _steps(job)}
    login = steps["docker/login-action"]
    assert login["if"] == "env.PUSH == 'true'"
    assert login["with"]["registry"] == "${{ env.REGISTRY }}"
    assert workflow["env"]["REGISTRY"] == "ghcr.io"
    assert login["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    build = steps["docker/build-push-action"]
    assert build["with"]["push"] == "${{ env.PUSH == 'true' }}"
    assert build["with"]["target"] == "${{ matrix.target }}"
    # Permissions default to read-only; only the image job may write packages.
    assert workflow["permissions"] == {"contents": "read"}
