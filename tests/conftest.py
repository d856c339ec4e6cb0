"""Real servers for the whole run: MariaDB (already running, or started), moto's S3 server, and helpers
that give every test its own database and bucket so tests never see each other's rows or objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from services.trainer.settings import TrainerSettings
from shared.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from tests.servers import VENV_BIN, free_port, running, wait_until

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DANDELION_DATA_DIR", REPO.parent / "shared" / "data" / "dandelion-grass")).resolve()
FLOWERS_DIR = Path(os.environ.get("DANDELION_FLOWERS_DIR", DATA_DIR.parent / "flowers")).resolve()
FLOWERS_TRAINED = 100
"""Photos of each flower folder the real champion is trained on (the first, by name); the rest are unseen."""
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "var" / "test-artifacts"))
MYSQL_HOST, MYSQL_PORT = "127.0.0.1", int(os.environ.get("TEST_MYSQL_PORT", "3306"))
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# No test may read the developer's own .env or embedded defaults by accident.
os.environ.update(AWS_ENV)
for leaked in ("DATABASE_URL", "OBJECT_STORE_URL", "S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(leaked, None)
# Nor may an API built by a test log predictions to the embedded default database under the repository: the
# tests that exercise the prediction log turn it on with a database of their own.
os.environ["API_PREDICTION_LOG"] = "false"


def pytest_configure(config: pytest.Config) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


def _mysql_answers() -> bool:
    pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", connect_timeout=2).close()
    return True


@pytest.fixture(scope="session")
def mariadb() -> str:
    """MariaDB on 127.0.0.1:3306 as root; started here if it is installed but down. Never skipped."""
    try:
        _mysql_answers()
    except pymysql.MySQLError:
        daemon = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", daemon], check=True)
        wait_until(_mysql_answers, None, 60, None, "MariaDB")
    return f"{MYSQL_HOST}:{MYSQL_PORT}"


class Databases:
    """Creates uniquely named databases and drops them at the end of the run."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _execute(self, sql: str) -> None:
        conn = pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", autocommit=True)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    def create(self, prefix: str = "dg_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.names.append(name)
        return name

    def drop_all(self) -> None:
        for name in self.names:
            self._execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="session")
def databases(mariadb: str) -> Iterator[Databases]:
    dbs = Databases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto_server) on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        ready=lambda: __import__("httpx").get(f"{url}/moto-api/", timeout=2).status_code < 500,
        log=ARTIFACTS / "moto.log",
        env=AWS_ENV,
        what="moto_server",
    ):
        yield url


def mysql_url_of(database: str) -> str:
    return f"mysql+asyncmy://root@{MYSQL_HOST}:{MYSQL_PORT}/{database}"


@pytest.fixture
def mysql_url(databases: Databases) -> str:
    """A fresh, empty MariaDB database for this test."""
    return mysql_url_of(databases.create())


@pytest.fixture
def s3_store(s3_endpoint: str) -> ObjectStoreSettings:
    """A fresh bucket on the S3 server for this test."""
    return ObjectStoreSettings(
        url=f"s3://bucket-{uuid.uuid4().hex[:12]}/data",
        endpoint_url=s3_endpoint,
        access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def stack_settings(mysql_url: str, s3_store: ObjectStoreSettings, tmp_path: Path) -> TrainerSettings:
    """Trainer settings on the real stack: MariaDB + S3, the shared photos as the source."""
    return TrainerSettings(
        store=s3_store,
        database=DatabaseSettings(url=mysql_url),
        registry=RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
        data_source=str(DATA_DIR),
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "dandelion").is_dir() or not (DATA_DIR / "grass").is_dir():
        raise RuntimeError(f"the labelled photos are not at {DATA_DIR}; set DANDELION_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def mlflow_server(databases: Databases, s3_endpoint: str) -> Iterator[str]:
    """A real ``mlflow server``: MariaDB backend store, artifacts in a bucket of the S3 server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials()).create_bucket(Bucket="mlflow")
    backend = f"mysql+pymysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{databases.create('dg_mlflow')}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend,
            "--default-artifact-root",
            "s3://mlflow/artifacts",
        ],
        ready=lambda: __import__("httpx").get(f"{url}/health", timeout=2).status_code == 200,
        log=ARTIFACTS / "mlflow-server.log",
        env={**AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        timeout=180,
        what="mlflow server",
    ):
        yield url


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def registry_settings(mlflow_server: str, s3_endpoint: str) -> RegistrySettings:
    """The real tracking server, with a model name of this test's own."""
    return RegistrySettings(
        tracking_uri=mlflow_server,
        s3_endpoint_url=s3_endpoint,
        experiment=f"exp-{uuid.uuid4().hex[:8]}",
        model_name=f"dandelion-grass-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    kinds = ("dandelion", "daisy", "rose", "sunflower", "tulip")
    if not all((FLOWERS_DIR / kind).is_dir() for kind in kinds):
        raise RuntimeError(f"the second photo source is not at {FLOWERS_DIR}; set DANDELION_FLOWERS_DIR")
    return FLOWERS_DIR


@pytest.fixture(scope="session")
def real_champion(
    databases: Databases, s3_endpoint: str, mlflow_server: str, data_dir: Path, flowers_dir: Path, tmp_path_factory
):
    """A model trained on real photos, registered on the real tracking server behind ``champion``: the 320
    dandelion and grass photos, and the first :data:`FLOWERS_TRAINED` of each folder of the second source
    (dandelions, and daisies, roses, sunflowers and tulips to refuse).

    The production recipe (pretrained backbone, head, cross-validation, calibration, in-domain scores) and code
    path: ingest -> features -> embed -> train -> register -> gate.
    """
    import asyncio

    from services.trainer.features import build_features
    from services.trainer.ingest import ingest
    from services.trainer.train import train_and_register

    settings = TrainerSettings(
        store=ObjectStoreSettings(
            url="s3://champion/data",
            endpoint_url=s3_endpoint,
            access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        ),
        database=DatabaseSettings(url=f"mysql+asyncmy://root@{MYSQL_HOST}:{MYSQL_PORT}/{databases.create()}"),
        registry=RegistrySettings(
            tracking_uri=mlflow_server,
            s3_endpoint_url=s3_endpoint,
            experiment="champion",
            model_name="dandelion-grass-champion",
        ),
        data_source=str(data_dir),
        promotion_floor=0.9,
    )
    asyncio.run(ingest(settings, progress=False))
    asyncio.run(ingest(settings, [f"flowers={flowers_dir}"], per_class=FLOWERS_TRAINED, progress=False))
    asyncio.run(build_features(settings, progress=False))
    result = train_and_register(settings, progress=False)
    assert result.decision.promote, result.decision.reason
    return settings, result


def settings_env(settings: TrainerSettings) -> dict[str, str]:
    """The contract's variables for ``settings``: what a CLI run or a trainer process needs to see them."""
    registry = settings.registry
    return {
        "DATABASE_URL": settings.database.url.get_secret_value(),
        "OBJECT_STORE_URL": settings.store.url,
        "S3_ENDPOINT_URL": settings.store.endpoint_url or "",
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MLFLOW_S3_ENDPOINT_URL": registry.s3_endpoint_url or "",
        "MLFLOW_EXPERIMENT_NAME": registry.experiment,
        "MODEL_NAME": registry.model_name,
    }


def api_env(registry: RegistrySettings, **extra: str) -> dict[str, str]:
    """Environment for ``python -m services.api`` serving ``registry``'s model; the prediction log is off
    unless ``DATABASE_URL`` is among ``extra``."""
    env = {
        **AWS_ENV,
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MODEL_NAME": registry.model_name,
        "MODEL_ALIAS": registry.model_alias,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if registry.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = registry.s3_endpoint_url
    env.update(extra)
    env["API_PREDICTION_LOG"] = "true" if "DATABASE_URL" in env else "false"  # never the embedded default
    return env
