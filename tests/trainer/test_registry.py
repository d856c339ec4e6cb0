"""The registry helpers the gate uses, on an embedded MLflow (a SQLite tracking store in the test's folder)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from services.trainer.head import SoftmaxHead
from services.trainer.registry import HEAD_ARTIFACT, champion_head, connect, current_champion
from shared.settings import RegistrySettings


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RegistrySettings:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "unchanged")  # restored after the test
    return RegistrySettings(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="exp-a",
        model_name="dg-registry-test",
        MLFLOW_LOCAL_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
    )


def test_connect_creates_the_experiment_once_beside_the_embedded_database(registry: RegistrySettings, tmp_path):
    client = connect(registry)
    experiment = client.get_experiment_by_name("exp-a")
    assert experiment.artifact_location == (tmp_path / "artifacts").resolve().as_uri()
    assert mlflow.get_tracking_uri() == registry.tracking_uri and mlflow.get_registry_uri() == registry.tracking_uri
    assert mlflow.get_experiment_by_name("exp-a").experiment_id == experiment.experiment_id
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "unchanged"  # no S3 endpoint configured: left alone
    again = connect(registry.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"}))
    assert again.get_experiment_by_name("exp-a").experiment_id == experiment.experiment_id
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"


def _version(client: MlflowClient, registry: RegistrySettings, params: dict[str, str]) -> tuple[str, str]:
    with mlflow.start_run() as run:
        mlflow.log_params(params)
    if not client.search_registered_models(f"name='{registry.model_name}'"):
        client.create_registered_model(registry.model_name)
    version = client.create_model_version(registry.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    return version.version, run.info.run_id


def test_current_champion_is_the_alias_or_none(registry: RegistrySettings) -> None:
    client = connect(registry)
    assert current_champion(client, registry) is None  # no such model
    first = _version(client, registry, {"embedding_spec": "k1"})
    assert current_champion(client, registry) is None  # a model, no alias yet
    second = _version(client, registry, {"embedding_spec": "k1"})
    client.set_registered_model_alias(registry.model_name, registry.model_alias, second[0])
    assert current_champion(client, registry) == second != first


def test_champion_head_only_for_the_same_embeddings_and_only_when_saved(registry: RegistrySettings, tmp_path) -> None:
    client = connect(registry)
    head = SoftmaxHead(
        ("dandelion", "grass", "neither"),
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.array([0.1, 0.2, 0.3]),
        np.array([1.0, 2.0]),
        np.array([0.5, 0.25]),
        c=2.0,
        calibration_scale=1.5,
        calibration_shift=-0.25,
    )
    np.savez(tmp_path / "head.npz", **head.to_arrays())
    with mlflow.start_run() as run:
        mlflow.log_param("embedding_spec", "k1")
        mlflow.log_artifact(str(tmp_path / "head.npz"), artifact_path=HEAD_ARTIFACT.rsplit("/", 1)[0])
    found = champion_head(client, run.info.run_id, "k1")
    assert isinstance(found, SoftmaxHead)
    for name, array in head.to_arrays().items():
        np.testing.assert_array_equal(found.to_arrays()[name], array, err_msg=name)
    assert champion_head(client, run.info.run_id, "k2") is None  # other embeddings: its network must answer
    with mlflow.start_run() as bare:
        mlflow.log_param("embedding_spec", "k1")
    assert champion_head(client, bare.info.run_id, "k1") is None  # an older run without a saved head
