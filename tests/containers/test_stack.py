"""The compose stack, up for real, from ``compose.yaml`` itself (as :mod:`tests.containers.hostnet` derives
what this machine can run): the trainer service registers and promotes, both API replicas become ready and
answer, their predictions land in the stack's database, and Prometheus scrapes both.
"""

from __future__ import annotations

import os
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

from tests.containers.docker import REPO, Docker, Images, champion_version, classify, wait_for
from tests.containers.hostnet import COMPOSE_FILE, Ports, for_this_machine

pytestmark = pytest.mark.slow

ENV_EXAMPLE = REPO / ".env.example"
# What the compose tool may see of the caller's environment: nothing that compose would interpolate (a
# variable in the environment wins over --env-file).
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH")
ENV = {key: value for key, value in os.environ.items() if key in PASSED_THROUGH}


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
            [*self.compose, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO, env=ENV
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
                420,
                f"the API replica on {port} ready",
                interval=1,
            )
        running.seconds_to_ready = time.monotonic() - started
        print(f"compose stack: both API replicas ready {running.seconds_to_ready:.0f} s after `up -d`")
        yield running
    except Exception:
        logs = subprocess.run([*command, "logs", "--no-color", "--tail", "40"], capture_output=True, text=True, env=ENV)
        print(logs.stdout[-12000:])
        raise
    finally:
        ids = subprocess.run([*command, "ps", "-q"], capture_output=True, text=True, env=ENV).stdout.split()
        subprocess.run(
            [*command, "down", "-v", "--remove-orphans", "-t", "20"], capture_output=True, timeout=300, env=ENV
        )
        labelled = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}", check=False)
        leftover = list(dict.fromkeys([*ids, *labelled.stdout.split()]))
        if leftover:
            docker("rm", "-f", "-v", *leftover, check=False)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}", check=False)
        if volumes.stdout.split():
            docker("volume", "rm", "-f", *volumes.stdout.split(), check=False)


def test_the_trainer_service_registers_and_promotes(stack: Stack, docker: Docker) -> None:
    trainer = stack.container("trainer")
    # The replicas are ready once the champion exists; the trainer may still be closing down.
    assert docker.wait(trainer, timeout=120) == 0, docker.logs(trainer)[-3000:]
    log = docker.logs(trainer)
    assert "champion" in log, log[-3000:]
    assert champion_version(f"http://127.0.0.1:{stack.ports.mlflow}", "dandelion-grass") == "1"


def test_both_replicas_answer_log_and_are_scraped(stack: Stack, data_dir: Path) -> None:
    for port in (stack.ports.api, stack.ports.api_2):
        answers = classify(port, data_dir)
        assert {label: answer["label"] for label, answer in answers.items()} == {
            "dandelion": "dandelion",
            "grass": "grass",
        }

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
