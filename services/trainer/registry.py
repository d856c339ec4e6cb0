"""MLflow connection and the quality gate that decides whether a new version becomes the champion."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shared.settings import RegistrySettings

log = logging.getLogger(__name__)


def connect(settings: RegistrySettings) -> MlflowClient:
    """Point MLflow at the configured tracking server and experiment; returns a client for the registry."""
    if settings.s3_endpoint_url:
        # MLflow's S3 artifact repository reads its endpoint from the process environment.
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    if client.get_experiment_by_name(settings.experiment) is None:
        location = None
        if settings.tracking_uri.startswith("sqlite:"):
            # Embedded mode: keep artifacts beside the database, not in ./mlruns of whatever directory.
            location = Path(settings.local_artifact_root).resolve().as_uri()
        try:
            client.create_experiment(settings.experiment, artifact_location=location)
        except MlflowException:
            if client.get_experiment_by_name(settings.experiment) is None:  # not a lost creation race
                raise
    mlflow.set_experiment(settings.experiment)
    return client


@dataclass(frozen=True, slots=True)
class Champion:
    version: str
    run_id: str
    accuracy: float
    roc_auc: float


def current_champion(client: MlflowClient, settings: RegistrySettings) -> tuple[str, str] | None:
    """``(version, run_id)`` behind the alias, or None when the alias is not set yet."""
    try:
        version = client.get_model_version_by_alias(settings.model_name, settings.model_alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return version.version, version.run_id


HEAD_ARTIFACT = "head/head.npz"
"""The fitted head of each run (its weights, standardisation, calibration): the gate re-scores a champion with it
from cached embeddings instead of running its whole network on the test photos."""


def champion_head(client: MlflowClient, run_id: str, spec_key: str):
    """The champion's head if it was trained on embeddings of ``spec_key`` (the same backbone, weights and side),
    else None (an older or different recipe: its own network has to answer)."""
    from services.trainer.head import SoftmaxHead

    run = client.get_run(run_id)
    if run.data.params.get("embedding_spec") != spec_key:
        return None
    try:
        local = client.download_artifacts(run_id, HEAD_ARTIFACT)
    except MlflowException:
        return None
    with np.load(local) as arrays:
        return SoftmaxHead.from_arrays(arrays)


def evaluate_version(settings: RegistrySettings, version: str, photos) -> np.ndarray:
    """The probabilities a registered version gives the image files ``photos`` (an iterable of bytes, read in
    batches: memory is one batch), in the product's label order, by running its own network."""
    from services.trainer.model import traced
    from shared.images import preprocess
    from shared.labels import LABELS

    uri = f"models:/{settings.model_name}/{version}"
    model = mlflow.tensorflow.load_model(uri)
    info = mlflow.models.get_model_info(uri)
    labels = tuple((info.metadata or {}).get("labels", LABELS))
    run = traced(model)
    answers, batch = [], []
    for data in photos:
        batch.append(preprocess(data))
        if len(batch) == 64:
            answers.append(run(np.stack(batch)))
            batch = []
    if batch:
        answers.append(run(np.stack(batch)))
    probs = np.concatenate(answers) if answers else np.zeros((0, len(LABELS)), np.float32)
    return probs[:, [labels.index(label) for label in LABELS]]


AUC_TIE_BREAK_MARGIN = 0.005
"""On equal test accuracy, how much higher the challenger's ROC AUC must be to win: a retrain on the same data
differs from the champion only in float noise, and noise must not displace a champion."""


@dataclass(frozen=True, slots=True)
class GateDecision:
    promote: bool
    reason: str
    champion_version: str | None
    champion_accuracy: float | None


def decide(
    accuracy: float,
    roc_auc: float,
    champion: Champion | None,
    floor: float,
    min_gain: float,
    force: bool,
) -> GateDecision:
    """Promote only on evidence: above the floor and better than the champion on the same test split.

    Accuracy decides; on a tie, a clearly higher ROC AUC does (a more confident ranking of the same answers).
    """
    version = champion.version if champion else None
    champ_acc = champion.accuracy if champion else None
    if force:
        return GateDecision(True, "forced by the operator (--force)", version, champ_acc)
    if accuracy < floor:
        return GateDecision(False, f"test accuracy {accuracy:.4f} is below the floor {floor:.4f}", version, champ_acc)
    if champion is None:
        return GateDecision(True, f"first model above the floor {floor:.4f} (accuracy {accuracy:.4f})", None, None)
    if accuracy > champion.accuracy + min_gain or (
        min_gain == 0 and accuracy == champion.accuracy and roc_auc > champion.roc_auc + AUC_TIE_BREAK_MARGIN
    ):
        return GateDecision(
            True,
            f"beats champion v{champion.version} on the same test split: accuracy {accuracy:.4f} vs "
            f"{champion.accuracy:.4f}, ROC AUC {roc_auc:.4f} vs {champion.roc_auc:.4f}",
            version,
            champ_acc,
        )
    return GateDecision(
        False,
        f"does not beat champion v{champion.version} on the same test split: accuracy {accuracy:.4f} vs "
        f"{champion.accuracy:.4f}, ROC AUC {roc_auc:.4f} vs {champion.roc_auc:.4f}",
        version,
        champ_acc,
    )
