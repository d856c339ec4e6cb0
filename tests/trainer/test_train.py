"""Training against a real MLflow server (MariaDB backend store, S3 artifacts) and the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc import scoring_server

from services.trainer.export import run_litert
from services.trainer.registry import Champion, decide
from services.trainer.settings import TrainerSettings
from services.trainer.train import train_and_register
from shared.images import preprocess
from shared.labels import LABELS
from shared.settings import RegistrySettings
from tests.crafted import crafted_jpeg, crafted_training


@pytest.fixture
def crafted_settings(
    stack_settings: TrainerSettings, registry_settings: RegistrySettings, tmp_path: Path
) -> TrainerSettings:
    return crafted_training(stack_settings, registry_settings, tmp_path / "crafted", per_class=40, floor=0.75)


@pytest.mark.slow
def test_train_register_gate_and_serve_contract(
    crafted_settings: TrainerSettings, s3_endpoint: str, tmp_path: Path
) -> None:
    settings = crafted_settings
    registry = settings.registry
    first = train_and_register(settings, progress=False)
    assert first.decision.promote, first.decision.reason
    assert first.version == "1"
    assert first.metrics["test_accuracy"] >= 0.75

    client = MlflowClient(registry.tracking_uri)
    assert client.get_model_version_by_alias(registry.model_name, "champion").version == "1"

    run = client.get_run(first.run_id)
    assert run.data.params["feature_set_version"] == "1"
    assert run.data.params["labels"] == "dandelion,grass"
    assert run.data.params["backbone"] == "efficientnet-lite0"
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc", "cm_dandelion_as_grass"):
        assert any(k.endswith(key) for k in run.data.metrics), key
    # The honest estimate travels with the run, beside the test split's.
    cv = first.cross_validation
    assert run.data.metrics["cv_accuracy_mean"] == pytest.approx(cv.mean)
    assert run.data.metrics["cv_accuracy_sd"] == pytest.approx(cv.sd)
    assert {"cv_recall_dandelion", "cv_recall_grass"} <= set(run.data.metrics)
    assert cv.photos == 80 and len(cv.fold_accuracies) == settings.cv_folds * settings.cv_repeats and cv.mean >= 0.9
    assert run.data.metrics["head_c"] in settings.head_c_grid
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "report")}
    assert {
        "report/confusion_matrix.png",
        "report/regularisation.png",
        "report/misclassified_test_images.png",
        "report/labels.json",
        "report/cross_validation.json",
        "report/in_domain.json",
    } <= artifacts
    assert run.data.tags["gate.promoted"] == "true"
    # "Neither": the figures of the in-domain score travel with the run too.
    domain = first.domain
    assert run.data.metrics["domain_cv_flagged"] == pytest.approx(domain.flagged)
    assert run.data.metrics["domain_ood_caught"] == pytest.approx(domain.caught)
    assert run.data.metrics["domain_ood_auroc"] == pytest.approx(domain.auroc) and domain.auroc > 0.8
    assert run.data.metrics["domain_ood_images"] >= 150 and run.data.params["domain_k"] == str(settings.domain_k)

    # The model files are in the S3 artifact store.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("MLmodel") for k in keys) and any(k.endswith(".keras") for k in keys), keys[:20]

    # Label order end to end, through the registered model as any MLflow client loads it.
    uri = f"models:/{registry.model_name}@champion"
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert pyfunc.metadata.metadata["labels"] == list(LABELS)
    x = np.stack([preprocess(crafted_jpeg("dandelion", 999_001)), preprocess(crafted_jpeg("grass", 999_002))])
    probs = np.asarray(pyfunc.predict(x))
    assert probs.shape == (2, 2)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["dandelion", "grass"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # The LiteRT export (what the API runs) answers the same probabilities plus one column, the in-domain
    # distance, computed in the same pass; the metadata says where it is and where "too far" starts.
    meta = pyfunc.metadata.metadata["in_domain"]
    assert meta["score_column"] == len(LABELS) and meta["k"] == settings.domain_k
    assert meta["threshold"] == pytest.approx(run.data.metrics["domain_threshold"])
    local = Path(mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path / "model")))
    flatbuffer = next(local.rglob("model.tflite")).read_bytes()
    blank = np.ones((1, *x.shape[1:]), np.float32)  # a white page: nothing like a lawn or a flower
    out = run_litert(flatbuffer, np.concatenate([x, blank]))
    assert out.shape == (3, len(LABELS) + 1)
    np.testing.assert_allclose(out[:2, : len(LABELS)], probs, atol=1e-5)
    assert (out[:2, -1] <= meta["threshold"]).all() and out[2, -1] > meta["threshold"], out[:, -1]

    # The seed's clients send {"inputs": [224 x 224 x 3 floats in [0, 1]]}: the scoring path accepts it.
    # This is the function behind `mlflow models serve`'s /invocations.
    payload = json.dumps({"inputs": [x[0].tolist()]})
    answer = scoring_server.invocations(payload, "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    assert answer.status == 200, answer.response
    served = np.asarray(json.loads(answer.response)["predictions"])
    assert served.shape == (1, 2) and int(np.argmax(served)) == 0

    # Retrained on the same data, the recipe gives the same model: it is registered, tagged with why, and does
    # not displace the champion on a tie (nothing random is left to win a tie-break by chance).
    again = train_and_register(settings, progress=False)
    assert not again.decision.promote
    assert again.version == "2"
    assert "does not beat champion v1" in again.decision.reason
    assert again.metrics["test_accuracy"] == first.metrics["test_accuracy"]
    assert again.metrics["test_roc_auc"] == first.metrics["test_roc_auc"]
    assert client.get_model_version_by_alias(registry.model_name, "champion").version == "1"
    tags = client.get_model_version(registry.model_name, "2").tags
    assert tags["gate"] == "rejected" and tags["gate_reason"] == again.decision.reason
    assert again.decision.champion_accuracy == pytest.approx(first.metrics["test_accuracy"])


def champion(accuracy: float, auc: float = 0.9) -> Champion:
    return Champion("3", "run", accuracy, auc)


@pytest.mark.parametrize(
    ("accuracy", "auc", "current", "force", "promote", "why"),
    [
        (0.70, 0.8, None, False, False, "below the floor"),
        (0.90, 0.9, None, False, True, "first model"),
        (0.95, 0.9, champion(0.93), False, True, "beats champion v3"),
        (0.93, 0.95, champion(0.93, 0.9), False, True, "beats champion v3"),
        (0.93, 0.85, champion(0.93, 0.9), False, False, "does not beat"),
        (0.93, 0.9004, champion(0.93, 0.9), False, False, "does not beat"),  # float noise is not a win
        (0.91, 0.99, champion(0.93), False, False, "does not beat"),
        (0.50, 0.5, champion(0.93), True, True, "forced"),
    ],
)
def test_gate(accuracy, auc, current, force, promote, why) -> None:
    decision = decide(accuracy, auc, current, floor=0.8, min_gain=0.0, force=force)
    assert decision.promote is promote
    assert why in decision.reason
