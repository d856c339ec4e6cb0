"""Kubernetes manifests: schema-valid (strict) one by one and once rendered, and the issue's contract."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import K8S_DIR, load_yaml, load_yaml_documents, render_kustomization, require_tool, run_tool

MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported cluster and the newest schema


def _by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render_kustomization()


@pytest.fixture(scope="module")
def api_deployment(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _by_kind(rendered, "Deployment")
    return deployment


def test_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    assert names >= {
        "namespace.yaml",
        "configmap.yaml",
        "secret.template.yaml",
        "api-deployment.yaml",
        "api-service.yaml",
        "api-ingress.yaml",
        "api-pdb.yaml",
        "api-hpa.yaml",
        "trainer-cronjob.yaml",
        "trainer-cronjob-prepare.yaml",
        "trainer-cronjob-embed.yaml",
        "trainer-cronjob-if-needed.yaml",
        "trainer-cronjob-prune.yaml",
        "trainer-job.yaml",
    }
    assert (K8S_DIR / "README.md").is_file()
    assert "kubectl apply -k k8s/" in (K8S_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_strict(manifest: Path, version: str) -> None:
    tool = require_tool("kubernetes-validate")
    run_tool([tool, "--strict", "--quiet", "-k", version, str(manifest)])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_kustomization_is_valid_strict(rendered: list[dict[str, Any]], tmp_path: Path, version: str) -> None:
    tool = require_tool("kubernetes-validate")
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered, sort_keys=False), encoding="utf-8")
    run_tool([tool, "--strict", "--quiet", "-k", version, str(out)])


def test_kustomization_lists_every_manifest_but_the_template_and_the_one_shot_job() -> None:
    listed = set(load_yaml(K8S_DIR / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in MANIFESTS} - {"secret.template.yaml", "trainer-job.yaml"}


def test_rendered_resources_are_namespaced_and_labelled(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(r["kind"] for r in rendered)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "Ingress",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "CronJob",
            "CronJob",
            "CronJob",
            "CronJob",
            "CronJob",
        ]
    )
    for resource in rendered:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "dandelion-grass", resource["metadata"]["name"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dandelion-grass"


def test_api_deployment_contract(api_deployment: dict[str, Any]) -> None:
    spec = api_deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    (container,) = pod["containers"]
    assert container["image"].startswith("ghcr.io/")
    assert container["image"].count(":") == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe_name, path in (
        ("startupProbe", "/health/ready"),
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
    ):
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert probe["port"] in ("http", 8000), probe_name
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    resources = container["resources"]
    assert resources["requests"]["cpu"] == "500m"
    assert resources["requests"]["memory"] == "1Gi"
    assert str(resources["limits"]["cpu"]) == "2"
    assert resources["limits"]["memory"] == "2Gi"
    env_from = {next(iter(e.values()))["name"] for e in container["envFrom"]}
    assert env_from == {"dandelion-grass-config", "dandelion-grass-secrets"}
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def _assert_restricted(pod: dict[str, Any]) -> None:
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{container['name']}: no writable /tmp"
        assert "emptyDir" in volumes[tmp[0]["name"]]


def test_api_security_context(api_deployment: dict[str, Any]) -> None:
    _assert_restricted(api_deployment["spec"]["template"]["spec"])


def test_api_spreads_across_nodes(api_deployment: dict[str, Any]) -> None:
    pod = api_deployment["spec"]["template"]["spec"]
    selector = api_deployment["spec"]["selector"]["matchLabels"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == selector
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_ingress_limits_match_the_api(rendered: list[dict[str, Any]]) -> None:
    """The proxy refuses what the API would refuse (body size) and gives up no sooner than the API does."""
    from services.api.settings import ApiSettings

    (ingress,) = _by_kind(rendered, "Ingress")
    (service,) = _by_kind(rendered, "Service")
    notes = ingress["metadata"]["annotations"]
    defaults = ApiSettings()
    assert (
        int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m")) * 2**20 == defaults.max_body_bytes
    )
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > defaults.request_timeout_s
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= defaults.body_read_timeout_s
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_service_nodeport(rendered: list[dict[str, Any]], api_deployment: dict[str, Any]) -> None:
    (service,) = _by_kind(rendered, "Service")
    assert service["spec"]["type"] == "NodePort"
    (port,) = service["spec"]["ports"]
    assert port["nodePort"] == 30080
    assert port["port"] == 8000
    assert port["targetPort"] in ("http", 8000)
    assert service["spec"]["selector"] == api_deployment["spec"]["selector"]["matchLabels"]


def test_pdb_and_hpa(rendered: list[dict[str, Any]], api_deployment: dict[str, Any]) -> None:
    (pdb,) = _by_kind(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == api_deployment["spec"]["selector"]["matchLabels"]
    (hpa,) = _by_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": api_deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"


def _is_weekly(schedule: str) -> bool:
    if schedule.strip() == "@weekly":
        return True
    fields = schedule.split()
    if len(fields) != 5:
        return False
    minute, hour, dom, month, dow = fields
    return (
        minute.isdigit()
        and hour.isdigit()
        and dom == "*"
        and month == "*"
        and re.fullmatch(r"[0-7]|SUN|MON|TUE|WED|THU|FRI|SAT", dow, re.IGNORECASE) is not None
    )


def _cronjob(rendered: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (cron,) = [c for c in _by_kind(rendered, "CronJob") if c["metadata"]["name"] == name]
    return cron


def test_trainer_cronjob_is_weekly(rendered: list[dict[str, Any]]) -> None:
    cron = _cronjob(rendered, "dandelion-grass-trainer")
    assert _is_weekly(cron["spec"]["schedule"]), cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == ["run"]
    assert container["image"].startswith("ghcr.io/")
    _assert_restricted(pod)


def test_continuous_training_cronjob(rendered: list[dict[str, Any]]) -> None:
    """Every 6 hours: ingest the source and the feedback, train only if needed; otherwise the weekly job's pod."""
    cron = _cronjob(rendered, "dandelion-grass-trainer-if-needed")
    weekly = _cronjob(rendered, "dandelion-grass-trainer")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*/6" and rest == ["*", "*", "*"], cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # A check that overran its slot is skipped rather than run late, and always ends before the next one.
    assert cron["spec"]["startingDeadlineSeconds"] <= 6 * 3600
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 6 * 3600
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == ["run", "--if-needed", "--from-feedback"]
    assert container["image"].startswith("ghcr.io/")
    _assert_restricted(pod)
    _assert_weekly_pod_but_args(pod, weekly)


def test_retention_cronjob(rendered: list[dict[str, Any]]) -> None:
    """Daily: prune old predictions and their uploads; otherwise the weekly job's pod."""
    cron = _cronjob(rendered, "dandelion-grass-prune-predictions")
    weekly = _cronjob(rendered, "dandelion-grass-trainer")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"], cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] <= 3600
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["prune"]
    _assert_restricted(pod)
    _assert_weekly_pod_but_args(pod, weekly)


def _minutes_into_week(schedule: str) -> int:
    minute, hour, day_of_month, month, weekday = schedule.split()
    assert (day_of_month, month) == ("*", "*") and weekday.isdigit(), schedule
    return (int(weekday) * 24 + int(hour)) * 60 + int(minute)


def test_the_weekly_run_is_prepared_and_its_embeddings_spread_before_it(rendered: list[dict[str, Any]]) -> None:
    """Monday: ingest + feature set on one pod, then the embeddings on an Indexed Job's pods, then the weekly run,
    each in order and each done (by its deadline) before the next starts."""
    weekly = _cronjob(rendered, "dandelion-grass-trainer")
    prepare = _cronjob(rendered, "dandelion-grass-prepare")
    embed = _cronjob(rendered, "dandelion-grass-embed")
    starts = [_minutes_into_week(c["spec"]["schedule"]) for c in (prepare, embed, weekly)]
    assert starts == sorted(starts) and len(set(starts)) == 3, starts
    for cron, next_start in ((prepare, starts[1]), (embed, starts[2])):
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        assert cron["spec"]["timeZone"] == weekly["spec"]["timeZone"]
        deadline_minutes = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] / 60
        assert _minutes_into_week(cron["spec"]["schedule"]) + deadline_minutes <= next_start, cron["metadata"]["name"]

    pod = prepare["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (ingest,), (features,) = pod["initContainers"], pod["containers"]
    assert (ingest["args"], features["args"]) == (["ingest"], ["features"])
    _assert_restricted(pod)
    weekly_pod = weekly["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (weekly_container,) = weekly_pod["containers"]
    for container in (ingest, features):
        assert {**container, "args": ["run"], "name": "trainer"} == weekly_container

    job = embed["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["embed", "--shards"] and "--shard" not in args  # each pod's part: JOB_COMPLETION_INDEX
    shards = int(args[2])
    assert shards > 1 and job["completions"] == job["parallelism"] == shards
    assert job["backoffLimitPerIndex"] >= 1 and job["maxFailedIndexes"] <= shards
    _assert_restricted(pod)
    assert container["image"] == weekly_container["image"]
    assert container["envFrom"] == weekly_container["envFrom"] and container["env"] == weekly_container["env"]
    assert {k: v for k, v in pod.items() if k != "containers"} == {
        k: v for k, v in weekly_pod.items() if k != "containers"
    }


def _assert_weekly_pod_but_args(pod: dict[str, Any], weekly: dict[str, Any]) -> None:
    """Same image, environment, resources and security context as the weekly run: only the arguments differ."""
    weekly_pod = weekly["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (weekly_container,) = weekly_pod["containers"]
    assert {**container, "args": weekly_container["args"]} == weekly_container
    assert {k: v for k, v in pod.items() if k != "containers"} == {
        k: v for k, v in weekly_pod.items() if k != "containers"
    }


def test_one_shot_trainer_job() -> None:
    (job,) = load_yaml_documents(K8S_DIR / "trainer-job.yaml")
    assert job["kind"] == "Job"
    assert job["metadata"]["generateName"].endswith("-")
    assert job["metadata"]["namespace"] == "dandelion-grass"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["run"]
    (cron,) = load_yaml_documents(K8S_DIR / "trainer-cronjob.yaml")
    # Same pod as the weekly CronJob's, so both runs behave alike.
    assert pod == cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    _assert_restricted(pod)


def test_configmap_carries_the_configuration_contract(rendered: list[dict[str, Any]]) -> None:
    (configmap,) = _by_kind(rendered, "ConfigMap")
    data = configmap["data"]
    assert set(data) >= {
        "OBJECT_STORE_URL",
        "S3_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "MODEL_NAME",
        "MODEL_ALIAS",
        "DATA_SOURCE",
        "API_PORT",
        "API_WORKERS",
        "API_POLL_INTERVAL_S",
        "API_MAX_BATCH_SIZE",
        "API_MAX_BATCH_WAIT_MS",
    }
    assert data["API_PORT"] == "8000"
    secret_names = {"DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not secret_names & set(data), "credentials belong in the Secret"


def test_secret_is_only_a_template() -> None:
    (secret,) = load_yaml_documents(K8S_DIR / "secret.template.yaml")
    assert secret["kind"] == "Secret"
    assert "data" not in secret
    assert set(secret["stringData"]) == {
        "DATABASE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "API_FEEDBACK_TOKEN",
    }
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key} looks like a real credential"
