"""Smoke tests of the built images (``.ci/images``), run on the machine's own engine.

The trainer image trains into a folder on embedded defaults; the API image serves that model the way a
cluster would run it (read-only root, no capabilities, uid 10001, a port of its own) and is judged on real
photos, by its own HEALTHCHECK and by how it stops. Then both run against the suite's real servers: the
containerised trainer registers on the MLflow server (MariaDB, S3) and the containerised API serves it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pymysql
import pytest

from tests.conftest import AWS_ENV, MYSQL_HOST, MYSQL_PORT, Databases
from tests.containers.docker import Docker, Images, champion_version, classify, wait_for
from tests.crafted import FAST_TRAINING
from tests.servers import free_port

pytestmark = pytest.mark.slow

APP_UID = 10001
LOCKED_DOWN = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
API_IMAGE_LIMIT_MB = 600
# The production recipe at a fifth of its pixels and one shuffle of three folds (tests.crafted.FAST_TRAINING):
# the images are under test here, not the recipe; the compose stack trains with compose.yaml's own settings.
FAST = {f"TRAINER_{key.upper()}": str(value) for key, value in FAST_TRAINING.items()}


def _writable_by_app(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, APP_UID, APP_UID)
    return path


def _train(docker: Docker, images: Images, data_dir: Path, *options: str, env: dict[str, str] | None = None):
    """Run the trainer image's `run` to the end; (exit code, log, seconds)."""
    started = time.monotonic()
    container = docker.run(
        images.tags["trainer"],
        "run",
        "--source",
        "/data",
        options=[*LOCKED_DOWN, "-v", f"{data_dir}:/data:ro", *options],
        env={**FAST, **(env or {})},
    )
    code = docker.wait(container, timeout=900)
    log = docker.logs(container)
    docker.remove(container)
    return code, log, time.monotonic() - started


def _serve(docker: Docker, images: Images, port: int, *options: str, env: dict[str, str]) -> str:
    """Start the API image locked down on ``port``; its container id once it is ready."""
    container = docker.run(
        images.tags["api"],
        options=[*LOCKED_DOWN, *options],
        env={"API_HOST": "127.0.0.1", "API_PORT": str(port), **env},
    )

    def ready() -> bool:
        if not docker.state(container)["Running"]:
            raise AssertionError(f"the API container exited:\n{docker.logs(container)[-3000:]}")
        return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200

    try:
        wait_for(ready, 120, "the API container ready")
    except TimeoutError as exc:
        log = docker.logs(container)[-3000:]
        docker.remove(container)
        raise AssertionError(f"{exc}\n{log}") from None
    return container


@pytest.fixture(scope="module")
def embedded_run(docker: Docker, images: Images, data_dir: Path, tmp_path_factory) -> tuple[Path, str]:
    """The trainer image's main job on embedded defaults (SQLite, local folders) into a folder of the host."""
    var = _writable_by_app(tmp_path_factory.mktemp("container-run") / "var")
    code, log, seconds = _train(docker, images, data_dir, "-v", f"{var}:/app/var")
    assert code == 0, log[-4000:]
    print(f"trainer image: `run` on embedded defaults in {seconds:.0f} s")
    return var, log


def test_the_trainer_image_trains_registers_and_promotes(embedded_run: tuple[Path, str], images: Images) -> None:
    var, log = embedded_run
    assert "champion" in log and "v1" in log, log[-3000:]
    assert (var / "mlflow.db").is_file() and (var / "dandelion.db").is_file()
    # The model card names the commit the image was built from (the image has no git to ask).
    (card,) = var.rglob("model_card.md")
    assert f"source revision `{images.revision}`" in card.read_text(), card.read_text()[:1500]
    # No git in the image: MLflow's GitPython stays quiet (it used to warn on every run).
    assert "git executable" not in log.lower() and "Traceback" not in log, log[-3000:]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def container_ids(docker: Docker) -> Iterator[list[str]]:
    """The containers a test starts, stopped and removed by id when it ends, passed or failed."""
    ids: list[str] = []
    yield ids
    for container in ids:
        docker.remove(container)


def test_the_api_image_serves_the_model_locked_down_on_a_port_of_its_own(
    docker: Docker, images: Images, embedded_run: tuple[Path, str], data_dir: Path, container_ids: list[str]
) -> None:
    var, _ = embedded_run
    port = free_port()
    # On the host's network a check that still probed 8000 would pass against whatever listens there.
    assert port != 8000 and not _listening(8000), "something listens on 8000: the HEALTHCHECK's port is not told"
    container = _serve(
        docker,
        images,
        port,
        "-v",
        f"{var}:/app/var:ro",
        # The model folder is read-only: the prediction log goes to the container's /tmp.
        env={"API_PREDICTION_LOG": "true", "DATABASE_URL": "sqlite+aiosqlite:////tmp/predictions.db"},
    )
    container_ids.append(container)
    assert httpx.get(f"http://127.0.0.1:{port}/version", timeout=5).status_code == 200  # MLflow's client's version
    uid = docker("exec", container, "python", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert uid == [str(APP_UID), str(APP_UID)]

    answers = classify(port, data_dir)
    for label, answer in answers.items():
        assert answer["label"] == label, answers
        assert answer["in_domain"] is True, answers
    assert answers["grass"]["model"]["version"] == "1"

    # Its own HEALTHCHECK, which reads API_PORT (it used to probe 8000 whatever the port).
    health = wait_for(
        lambda: (status := docker.state(container)["Health"]["Status"]) != "starting" and status,
        90,
        "a health verdict",
        interval=1,
    )
    assert health == "healthy", docker.state(container)["Health"]

    started = time.monotonic()
    docker("stop", "-t", "20", container, timeout=60)
    stopped_in = time.monotonic() - started
    state = docker.state(container)
    assert state["ExitCode"] == 0, docker.logs(container)[-3000:]
    assert stopped_in < 20, f"took {stopped_in:.1f} s: SIGKILL after the grace period"
    print(f"API image: stopped in {stopped_in:.1f} s, exit 0")


def test_the_api_image_holds_the_serving_runtime_only(docker: Docker, images: Images) -> None:
    size_mb = int(docker("image", "inspect", "-f", "{{.Size}}", images.tags["api"]).stdout) / 1e6
    print(f"API image: {size_mb:.0f} MB")
    assert size_mb <= API_IMAGE_LIMIT_MB
    left_out = ("tensorflow", "keras", "pandas", "pyarrow", "sklearn", "scipy", "matplotlib", "pip")
    probe = f"import importlib.util as u; print([m for m in {left_out!r} if u.find_spec(m)])"
    container = docker.run(images.tags["api"], "python", "-c", probe)
    assert docker.wait(container, timeout=60) == 0
    assert docker.logs(container).strip() == "[]"
    docker.remove(container)


def test_the_images_against_the_real_servers(
    docker: Docker,
    images: Images,
    data_dir: Path,
    databases: Databases,
    s3_endpoint: str,
    mlflow_server: str,
    tmp_path: Path,
    container_ids: list[str],
) -> None:
    """The containerised trainer registers on the suite's MLflow server; the containerised API serves it."""
    database = databases.create()
    model = f"dandelion-grass-{uuid.uuid4().hex[:8]}"
    env = {
        **AWS_ENV,
        "DATABASE_URL": f"mysql+asyncmy://root@{MYSQL_HOST}:{MYSQL_PORT}/{database}",
        "OBJECT_STORE_URL": f"s3://bucket-{uuid.uuid4().hex[:12]}/data",
        "S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_EXPERIMENT_NAME": model,
        "MODEL_NAME": model,
    }
    var = _writable_by_app(tmp_path / "var")
    code, log, seconds = _train(docker, images, data_dir, "-v", f"{var}:/app/var", env=env)
    assert code == 0, log[-4000:]
    print(f"trainer image: `run` against MariaDB, S3 and the MLflow server in {seconds:.0f} s")
    assert champion_version(mlflow_server, model) == "1"

    port = free_port()
    container = _serve(docker, images, port, env={**env, "API_PREDICTION_LOG": "true"})
    container_ids.append(container)
    answers = classify(port, data_dir)
    assert {label: answer["label"] for label, answer in answers.items()} == {"dandelion": "dandelion", "grass": "grass"}
    assert {answer["model"]["name"] for answer in answers.values()} == {model}

    def logged() -> list[str]:
        connection = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", database=database)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT label FROM predictions")
                return [row[0] for row in cursor.fetchall()]
        finally:
            connection.close()

    assert sorted(wait_for(logged, 30, "the predictions in MariaDB")) == ["dandelion", "grass"]
    docker("stop", "-t", "20", container, timeout=60)
    assert docker.state(container)["ExitCode"] == 0, docker.logs(container)[-3000:]
