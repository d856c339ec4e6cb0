"""The compose stack, up for real, from ``compose.yaml`` itself.

What this machine needs is derived here from the file, not kept as a second stack: every service on the
host's network (there is no bridge; test traffic goes to 127.0.0.1 only), so service names become
127.0.0.1 and each server gets a free port of its own; the third-party images that cannot be pulled here
are replaced by the stand-ins the images check built (tests/containers/standins: MariaDB for MySQL, moto's
server for Minio, Debian's Prometheus); Grafana cannot be had, and its provisioning stays validated
statically (tests/deploy). Everything else (the product's images, commands, healthchecks, start order,
volumes, limits, security options) is compose.yaml's own.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pymysql
import pytest
import yaml

from tests.containers.docker import REPO, Docker, Images, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.slow

COMPOSE_FILE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
PHOTOS = {"dandelion": "dandelion/00000000.jpg", "grass": "grass/00000000.jpg"}


@dataclass(frozen=True)
class Ports:
    mysql: int
    s3: int
    mlflow: int
    api: int
    api_2: int
    prometheus: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(6)))


def _replace(value, old: str, new: str):
    """``value`` with ``old`` replaced by ``new`` in every string inside it."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: _replace(item, old, new) for key, item in value.items()}
    return value


def _absolute(volume: str) -> str:
    """A bind mount relative to the compose file, made absolute (the derived file lives elsewhere)."""
    source, _, rest = volume.partition(":")
    return f"{(REPO / source).resolve()}:{rest}" if source.startswith("./") else volume


def for_this_machine(compose: dict, ports: Ports, images: Images, data_dir: Path, work: Path) -> dict:
    """compose.yaml as this machine can run it: host networking, stand-ins, free ports (see the module)."""
    stack = copy.deepcopy(compose)
    services: dict[str, dict] = stack["services"]
    del services["grafana"]
    stack["volumes"].pop("grafana-data", None)
    for old, new in {
        "@mysql:3306/": f"@127.0.0.1:{ports.mysql}/",
        "http://minio:9000": f"http://127.0.0.1:{ports.s3}",
        "http://mlflow:5000": f"http://127.0.0.1:{ports.mlflow}",
    }.items():
        services = _replace(services, old, new)
    for service in services.values():
        service["network_mode"] = "host"
        service.pop("ports", None)
        service.pop("networks", None)
        service["volumes"] = [_absolute(v) if isinstance(v, str) else v for v in service.get("volumes", [])]
        service.pop("build", None)  # the images check built them (IMAGE_TAG=ci)

    mysql = services["mysql"]
    mysql["image"] = images.tags["standin-mariadb"]
    mysql["command"] = [*mysql["command"], f"--port={ports.mysql}", "--bind-address=127.0.0.1"]

    minio = services["minio"]
    minio["image"] = images.tags["standin-s3"]
    minio["command"] = ["-H", "127.0.0.1", "-p", str(ports.s3)]
    minio["healthcheck"]["test"] = ["CMD", "python", "-c", _http_check(ports.s3, "/moto-api/")]
    minio["volumes"] = []
    init = services["minio-init"]
    buckets = re.findall(r"local/([\w.-]+)", re.search(r"mc mb [^\n]*", init["command"][0]).group(0))
    init["image"] = images.tags["standin-s3"]
    init["entrypoint"] = ["make-buckets"]
    init["command"] = [f"http://127.0.0.1:{ports.s3}", *buckets]
    init["environment"] = {
        "AWS_ACCESS_KEY_ID": init["environment"]["APP_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": init["environment"]["APP_SECRET_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    mlflow = services["mlflow"]
    mlflow["command"] = _replace(_replace(mlflow["command"], "5000", str(ports.mlflow)), "0.0.0.0", "127.0.0.1")
    mlflow["healthcheck"] = _replace(mlflow["healthcheck"], ":5000/", f":{ports.mlflow}/")

    trainer = services["trainer"]
    trainer["environment"]["DATA_SOURCE"] = "/data"
    trainer["volumes"].append(f"{data_dir}:/data:ro")

    for name, port in (("api", ports.api), ("api-2", ports.api_2)):
        services[name]["environment"].update(API_HOST="127.0.0.1", API_PORT=str(port))

    prometheus = services["prometheus"]
    config = work / "prometheus"
    shutil.copytree(REPO / "monitoring" / "prometheus", config)
    scrape = (config / "prometheus.yml").read_text()
    for old, new in {
        '"api:8000"': f'"127.0.0.1:{ports.api}"',
        '"api-2:8000"': f'"127.0.0.1:{ports.api_2}"',
        '"localhost:9090"': f'"127.0.0.1:{ports.prometheus}"',
    }.items():
        assert old in scrape, old
        scrape = scrape.replace(old, new)
    (config / "prometheus.yml").write_text(scrape)
    prometheus["image"] = images.tags["standin-prometheus"]
    prometheus["command"] = [*prometheus["command"], f"--web.listen-address=127.0.0.1:{ports.prometheus}"]
    prometheus["volumes"] = [
        f"{config}:/etc/prometheus:ro" if v.endswith(":/etc/prometheus:ro") else v for v in prometheus["volumes"]
    ]
    prometheus["healthcheck"] = _replace(prometheus["healthcheck"], ":9090/", f":{ports.prometheus}/")

    stack["services"] = services
    return stack


def _http_check(port: int, path: str) -> str:
    return f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4)"


def _env_file(work: Path) -> Path:
    """.env.example with every change-me value replaced, as its header asks; the images the check built."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and value.startswith("change-me"):
            value = f"{key.lower().replace('_', '-')}-{uuid.uuid4().hex[:12]}"
        if key == "IMAGE_TAG":
            value = "ci"
        lines.append(f"{key}{sep}{value}")
    path = work / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _env_values(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, sep, value in pairs if sep}


@dataclass
class Stack:
    ports: Ports
    env: dict[str, str]
    compose: list[str]
    project: str
    seconds_to_ready: float = 0.0

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.compose, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
        )
        if done.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()


@pytest.fixture(scope="module")
def stack(docker: Docker, images: Images, data_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    compose_tool = shutil.which("docker-compose")
    assert compose_tool, "docker-compose is not installed (.ci/run installs Debian's)"
    work = tmp_path_factory.mktemp("stack")
    ports = Ports.free()
    derived = for_this_machine(yaml.safe_load(COMPOSE_FILE.read_text()), ports, images, data_dir, work)
    (work / "compose.yaml").write_text(yaml.safe_dump(derived, sort_keys=False))
    env_file = _env_file(work)
    project = f"dgstack{uuid.uuid4().hex[:8]}"
    command = [compose_tool, "-p", project, "--project-directory", str(work), "-f", str(work / "compose.yaml")]
    command += ["--env-file", str(env_file)]
    running = Stack(ports, _env_values(env_file), command, project)
    started = time.monotonic()
    try:
        running("up", "-d", "--no-build", timeout=900)
        for port in (ports.api, ports.api_2):
            wait_for(
                lambda port=port: httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200,
                300,
                f"the API replica on {port} ready",
                interval=1,
            )
        running.seconds_to_ready = time.monotonic() - started
        print(f"compose stack: both API replicas ready {running.seconds_to_ready:.0f} s after `up -d`")
        yield running
    except Exception:
        logs = subprocess.run([*command, "logs", "--no-color", "--tail", "40"], capture_output=True, text=True)
        print(logs.stdout[-12000:])
        raise
    finally:
        ids = subprocess.run([*command, "ps", "-q"], capture_output=True, text=True).stdout.split()
        subprocess.run([*command, "down", "-v", "--remove-orphans", "-t", "20"], capture_output=True, timeout=300)
        labelled = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}", check=False)
        leftover = list(dict.fromkeys([*ids, *labelled.stdout.split()]))
        if leftover:
            docker("rm", "-f", "-v", *leftover, check=False)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}", check=False)
        if volumes.stdout.split():
            docker("volume", "rm", "-f", *volumes.stdout.split(), check=False)


def test_the_derived_stack_keeps_compose_yaml_and_only_adapts_it(
    images: Images, data_dir: Path, tmp_path: Path
) -> None:
    original = yaml.safe_load(COMPOSE_FILE.read_text())
    derived = for_this_machine(original, Ports.free(), images, data_dir, tmp_path)
    assert set(derived["services"]) == set(original["services"]) - {"grafana"}
    for name, service in derived["services"].items():
        assert service["network_mode"] == "host" and "ports" not in service, name
        contacted = {**service, "environment": dict(service.get("environment") or {})}
        contacted["environment"].pop("MLFLOW_SERVER_ALLOWED_HOSTS", None)  # names accepted, not addresses used
        text = yaml.safe_dump(contacted)
        assert not re.search(r"\b(mysql|minio|mlflow):\d", text), f"{name} still names a service host: {text}"
        assert "0.0.0.0" not in text, name
    for name in ("api", "api-2", "trainer", "mlflow"):  # the product's images, as compose.yaml names them
        assert derived["services"][name]["image"] == original["services"][name]["image"], name
        for key in ("security_opt", "cap_drop", "read_only", "depends_on", "mem_limit"):
            assert derived["services"][name].get(key) == original["services"][name].get(key), (name, key)


def test_the_trainer_service_registers_and_promotes(stack: Stack) -> None:
    trainer = stack.container("trainer")
    state = stack("ps", "trainer").stdout
    assert "Exit 0" in state, state
    log = subprocess.run([*stack.compose, "logs", "--no-color", "trainer"], capture_output=True, text=True).stdout
    assert "champion" in log, log[-3000:]
    assert trainer
    alias = httpx.get(
        f"http://127.0.0.1:{stack.ports.mlflow}/api/2.0/mlflow/registered-models/alias",
        params={"name": "dandelion-grass", "alias": "champion"},
        timeout=10,
    )
    assert alias.status_code == 200 and alias.json()["model_version"]["version"] == "1", alias.text


def test_both_replicas_answer_log_and_are_scraped(stack: Stack, data_dir: Path) -> None:
    for port in (stack.ports.api, stack.ports.api_2):
        for label, photo in PHOTOS.items():
            path = data_dir / photo
            response = httpx.post(
                f"http://127.0.0.1:{port}/predict",
                files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            assert response.json()["label"] == label, response.json()

    def logged() -> list[tuple[str, str]] | None:
        connection = pymysql.connect(
            host="127.0.0.1",
            port=stack.ports.mysql,
            user=stack.env["MYSQL_USER"],
            password=stack.env["MYSQL_PASSWORD"],
            database="dandelion",
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT label, COUNT(*) FROM predictions GROUP BY label ORDER BY label")
                rows = cursor.fetchall()
        finally:
            connection.close()
        return rows if sum(count for _, count in rows) >= 4 else None

    assert wait_for(logged, 30, "four predictions in the stack's MySQL") == (("dandelion", 2), ("grass", 2))

    prometheus = f"http://127.0.0.1:{stack.ports.prometheus}"

    def scraped() -> dict[str, float] | None:
        query = 'sum by (replica) (http_requests_total{job="api", handler="/predict"})'
        result = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]
        by_replica = {series["metric"]["replica"]: float(series["value"][1]) for series in result}
        return by_replica if set(by_replica) == {"api", "api-2"} and min(by_replica.values()) >= 2 else None

    print("Prometheus, /predict requests by replica:", wait_for(scraped, 90, "both replicas scraped", interval=2))
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    health = {target["labels"].get("replica", target["labels"]["job"]): target["health"] for target in targets}
    assert health == {"api": "up", "api-2": "up", "prometheus": "up"}, targets
