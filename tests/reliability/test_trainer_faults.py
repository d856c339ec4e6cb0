"""Trainer faults on the real stack (MariaDB, moto S3, MLflow server): a SIGKILL mid-training, and the
database connection dropped between runs. Neither may corrupt the registry or the metadata."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sqlalchemy import func, select, text

from services.trainer.features import build_features
from services.trainer.ingest import ingest
from services.trainer.settings import TrainerSettings
from services.trainer.train import train_and_register
from shared.db import open_database
from shared.settings import DatabaseSettings, RegistrySettings
from shared.tables import ImageRow
from tests.conftest import ARTIFACTS, AWS_ENV, MYSQL_PORT, settings_env
from tests.crafted import FAST_TRAINING, crafted_training, write_crafted_folder
from tests.servers import TcpProxy

pytestmark = pytest.mark.slow

MIDWAY_METRIC = "training_seconds"
"""Logged once the head is fitted, before the network is built, exported to LiteRT and registered (tens of
seconds here)."""


@pytest.fixture
def crafted_settings(
    stack_settings: TrainerSettings, registry_settings: RegistrySettings, tmp_path: Path
) -> TrainerSettings:
    return crafted_training(stack_settings, registry_settings, tmp_path / "crafted", per_class=30, floor=0.6)


def trainer_env(settings: TrainerSettings) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        **AWS_ENV,
        **settings_env(settings),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def wait_for_midway_metric(client: MlflowClient, experiment: str, known: set[str], process: subprocess.Popen) -> str:
    """The id of the new run once it is half-way: its features computed, nothing registered yet."""
    exp = client.get_experiment_by_name(experiment)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the trainer exited ({process.returncode}) before it could be killed"
        if exp is None:
            exp = client.get_experiment_by_name(experiment)
        else:
            for run in client.search_runs([exp.experiment_id]):
                if run.info.run_id not in known and client.get_metric_history(run.info.run_id, MIDWAY_METRIC):
                    return run.info.run_id
        time.sleep(0.2)
    raise TimeoutError("the trainer did not get half-way in time")


def test_sigkill_mid_training_leaves_the_champion_alone(crafted_settings: TrainerSettings) -> None:
    registry = crafted_settings.registry
    first = train_and_register(crafted_settings, progress=False)
    assert first.version == "1" and first.decision.promote, first.decision.reason

    client = MlflowClient(registry.tracking_uri)
    experiment = client.get_experiment_by_name(registry.experiment)
    known = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    log = ARTIFACTS / "trainer-sigkill.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer", "train", "--quiet"],
            env=trainer_env(crafted_settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        killed_run = wait_for_midway_metric(client, registry.experiment, known, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL

    assert client.get_model_version_by_alias(registry.model_name, registry.model_alias).version == "1"
    versions = client.search_model_versions(f"name='{registry.model_name}'")
    assert [v.version for v in versions] == ["1"], "a killed training registered a version"
    # The killed run is left RUNNING in the tracking server (nothing could end it); it must not be the champion's.
    assert client.get_run(killed_run).info.status == "RUNNING"

    again = train_and_register(crafted_settings, progress=False)
    assert again.version == "2"
    champion = client.get_model_version_by_alias(registry.model_name, registry.model_alias).version
    assert champion == ("2" if again.decision.promote else "1")


async def count_images(database: DatabaseSettings) -> tuple[int, int]:
    async with open_database(database) as sessions, sessions() as session:
        rows = await session.scalar(select(func.count()).select_from(ImageRow))
        distinct = await session.scalar(select(func.count(func.distinct(ImageRow.sha256))))
    return rows, distinct


def test_database_connection_dropped_between_runs(stack_settings: TrainerSettings, tmp_path: Path) -> None:
    """Every connection reset between two runs: the second run neither fails nor duplicates. Each run opens an
    engine of its own, so this holds without ``pool_pre_ping``; the test below is the one that needs it."""
    folder = write_crafted_folder(tmp_path / "crafted", per_class=30)
    proxy = TcpProxy("127.0.0.1", MYSQL_PORT).start()
    try:
        url = stack_settings.database.url.get_secret_value().replace(f":{MYSQL_PORT}/", f":{proxy.port}/")
        settings = stack_settings.model_copy(
            update={"database": DatabaseSettings(url=url), "data_source": str(folder), **FAST_TRAINING}
        )
        first = asyncio.run(ingest(settings, progress=False))
        assert (first.new, first.failed) == (60, 0)

        proxy.stop()  # every open connection is reset ...
        proxy.start()  # ... and the database is back on the same port

        second = asyncio.run(ingest(settings, progress=False))
        assert (second.new, second.duplicate, second.failed) == (0, 60, 0)
        feature_set = asyncio.run(build_features(settings, progress=False))
        assert feature_set.created
        assert asyncio.run(count_images(settings.database)) == (60, 60), "duplicates after the reconnect"
    finally:
        proxy.stop()


def test_pooled_connection_reset_under_a_live_engine(stack_settings: TrainerSettings) -> None:
    """The same drop while one engine holds pooled connections: ``pool_pre_ping`` replaces the dead ones."""
    proxy = TcpProxy("127.0.0.1", MYSQL_PORT).start()
    url = stack_settings.database.url.get_secret_value().replace(f":{MYSQL_PORT}/", f":{proxy.port}/")

    async def scenario() -> None:
        async with open_database(DatabaseSettings(url=url)) as sessions:
            async with sessions() as session:
                assert await session.scalar(text("SELECT 1")) == 1
            proxy.stop()
            proxy.start()
            async with sessions() as session:
                assert await session.scalar(text("SELECT 1")) == 1

    try:
        asyncio.run(scenario())
    finally:
        proxy.stop()
