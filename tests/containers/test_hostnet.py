"""The derivation of the stack this machine can run from compose.yaml (no engine needed)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.containers.docker import Images
from tests.containers.hostnet import COMPOSE_FILE, Ports, for_this_machine

STANDINS = {name: f"dandelion-grass-standin-{name}:ci" for name in ("mariadb", "s3", "prometheus")}


def _derive(tmp_path: Path, ports: Ports | None = None) -> tuple[dict, dict, Ports]:
    original = yaml.safe_load(COMPOSE_FILE.read_text())
    ports = ports or Ports.free()
    images = Images(docker="/usr/bin/docker", tags={f"standin-{k}": v for k, v in STANDINS.items()})
    return original, for_this_machine(original, ports, images, Path("/photos"), tmp_path), ports


def test_every_service_is_on_the_host_network_and_talks_to_127_0_0_1(tmp_path: Path) -> None:
    original, derived, ports = _derive(tmp_path)
    assert set(derived["services"]) == set(original["services"]) - {"grafana"}
    for name, service in derived["services"].items():
        assert service["network_mode"] == "host" and "ports" not in service and "networks" not in service, name
        contacted = {**service, "environment": dict(service.get("environment") or {})}
        contacted["environment"].pop("MLFLOW_SERVER_ALLOWED_HOSTS", None)  # names accepted, not addresses used
        text = yaml.safe_dump(contacted)
        assert not re.search(r"\b(mysql|minio|mlflow|api|api-2):\d", text), f"{name} still names a service host"
        assert "0.0.0.0" not in text, name
        hosts = set(re.findall(r"(?:https?://|@)([\w.-]+):\d+", text))
        assert hosts <= {"127.0.0.1"}, (name, hosts)
    env = derived["services"]["api"]["environment"]
    assert env["DATABASE_URL"].endswith(f"@127.0.0.1:{ports.mysql}/dandelion")
    assert env["S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports.s3}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports.mlflow}"
    assert {derived["services"][n]["environment"]["API_PORT"] for n in ("api", "api-2")} == {
        str(ports.api),
        str(ports.api_2),
    }
    scrape = (tmp_path / "prometheus" / "prometheus.yml").read_text()
    for port in (ports.api, ports.api_2, ports.prometheus):
        assert f'"127.0.0.1:{port}"' in scrape


def test_the_products_services_keep_what_compose_yaml_says(tmp_path: Path) -> None:
    original, derived, _ = _derive(tmp_path)
    for name in ("api", "api-2", "trainer", "mlflow"):  # the product's images, as compose.yaml names them
        for key in ("image", "security_opt", "cap_drop", "read_only", "tmpfs", "depends_on", "mem_limit", "restart"):
            assert derived["services"][name].get(key) == original["services"][name].get(key), (name, key)
    for name, service in original["services"].items():  # the start order, untouched
        if name != "grafana":
            assert derived["services"][name].get("depends_on") == service.get("depends_on"), name
    # Only the stand-ins replace images, and only where compose.yaml names a third-party image.
    replaced = {n for n, s in derived["services"].items() if s["image"] != original["services"][n]["image"]}
    assert replaced == {"mysql", "minio", "minio-init", "prometheus"}
    # The buckets are the ones minio-init's `mc mb` makes.
    assert derived["services"]["minio-init"]["command"][1:] == ["dandelion", "mlflow"]


def test_the_ports_are_distinct() -> None:
    for _ in range(20):
        ports = Ports.free()
        assert len(set(vars(ports).values())) == 6
