"""Training against a real MLflow server (MariaDB backend store, S3 artifacts) and the quality gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc import scoring_server

from services.trainer.export import run_litert
from services.trainer.registry import AUC_TIE_BREAK_MARGIN, Champion, decide
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
    return crafted_training(
        stack_settings, registry_settings, tmp_path / "crafted", per_class=40, floor=0.75, refused={"daisy": 30}
    )


def card_rows(card: str) -> dict[str, str]:
    """``metric -> value`` of the model card's evidence table."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \| `([a-z0-9_\-]+)` \|$", card, flags=re.MULTILINE)
    return {metric: value for _, value, metric in rows}


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
    params = run.data.params
    assert params["feature_set_version"] == "1" and params["labels"] == "dandelion,grass"
    assert params["backbone"] == "efficientnet-lite0" and params["head_classes"] == "dandelion,grass,daisy"
    assert params["embedding_spec"].startswith("efficientnet-lite0@128-")
    metrics = run.data.metrics
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc", "cm_dandelion_as_grass"):
        assert any(k.endswith(key) for k in metrics), key
    # The honest estimate travels with the run, beside the test split's: accuracy, calibration, "neither".
    est = first.estimates
    assert metrics["cv_accuracy_mean"] == pytest.approx(est.mean) and metrics["cv_accuracy_sd"] == pytest.approx(est.sd)
    assert est.plan.photos == 110 and len(est.fold_accuracies) == settings.cv_folds * settings.cv_repeats
    assert est.mean >= 0.9 and {"cv_recall_dandelion", "cv_recall_grass", "cv_accuracy_small"} <= set(metrics)
    assert metrics["head_c"] in settings.head_c_grid
    figures = ("calibration_ece_before", "calibration_ece_after", "calibration_temperature", "low_confidence_threshold",
               "domain_cv_flagged", "domain_caught_daisy", "domain_ood_caught", "domain_ood_auroc")  # fmt: skip
    for key in figures:
        assert np.isfinite(metrics[key]), key
    assert metrics["domain_caught_daisy"] >= 0.8 and metrics["domain_ood_images"] >= 150
    assert params["domain_k"] == str(settings.domain_k)
    reports = {a.path for a in client.list_artifacts(first.run_id, "report")}
    assert {
        "report/confusion_matrix.png",
        "report/misclassified_test_images.png",
        "report/reliability.png",
        "report/learning_curve.png",
        "report/labels.json",
        "report/cross_validation.json",
        "report/cross_source.json",
        "report/in_domain.json",
    } <= reports
    assert {"model_card.md", "head"} <= {a.path for a in client.list_artifacts(first.run_id)}
    cv_json = client.download_artifacts(first.run_id, "report/cross_validation.json", str(tmp_path))
    cv = json.loads(Path(cv_json).read_text())
    curve = cv["learning_curve"]
    assert [p["training_photos"] for p in curve] == sorted(p["training_photos"] for p in curve) and len(curve) == 4
    assert curve[-1]["training_photos"] == pytest.approx(110 * (settings.cv_folds - 1) / settings.cv_folds, abs=2)
    assert run.data.tags["gate.promoted"] == "true"

    # The model card: every figure in its table is the logged metric, as printed.
    card = Path(client.download_artifacts(first.run_id, "model_card.md", str(tmp_path))).read_text()
    shown = card_rows(card)
    assert len(shown) >= 15 and "domain_caught_daisy" in shown
    for metric, value in shown.items():
        logged = metrics[metric]
        expected = f"{logged * 100:.1f} %" if value.endswith("%") else f"{logged:.3f}"
        expected = expected if np.isfinite(logged) else "n/a"
        assert value == expected, (metric, value, logged)
    assert f"{registry.model_name} v1" in card and "Promoted" in card and "daisy" in card

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

    # The LiteRT export (what the API runs) answers the same, calibrated probabilities, then the in-domain distance,
    # P(neither) and the activation map, from one pass; the metadata says where each is and where "neither" starts.
    meta = pyfunc.metadata.metadata
    domain, layout = meta["in_domain"], meta["outputs"]
    assert domain["score_column"] == layout["domain_distance"] == 2 and layout["neither"] == 3
    assert domain["k"] == settings.domain_k and domain["threshold"] == pytest.approx(metrics["domain_threshold"])
    assert domain["refused_kinds"] == ["daisy"] and meta["low_confidence_threshold"] == pytest.approx(
        metrics["low_confidence_threshold"]
    )
    local = Path(mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path / "model")))
    flatbuffer = next(local.rglob("model.tflite")).read_bytes()
    blank = np.ones((1, *x.shape[1:]), np.float32)  # a white page: nothing like a lawn or a flower
    daisy = preprocess(crafted_jpeg("daisy", 999_003))[np.newaxis]
    out = run_litert(flatbuffer, np.concatenate([x, blank, daisy]))
    grid = layout["explain"]["grid"][0]
    assert grid == 4 and out.shape == (4, layout["columns"]) == (4, 4 + grid * grid)  # 128 px / 32
    np.testing.assert_allclose(out[:2, :2], probs, atol=1e-5)
    distance, neither = out[:, 2], out[:, 3]
    assert (distance[:2] <= domain["threshold"]).all() and distance[2] > domain["threshold"], distance
    assert neither[3] > domain["neither_threshold"] >= neither[:2].max(), neither
    evidence = out[:, 4:].reshape(4, grid, grid)
    assert evidence[0].mean() > 0 > evidence[1].mean(), "the map argues for dandelion on a dandelion, not on grass"

    # The seed's clients send {"inputs": [224 x 224 x 3 floats in [0, 1]]}: the scoring path accepts it.
    # This is the function behind `mlflow models serve`'s /invocations.
    payload = json.dumps({"inputs": [x[0].tolist()]})
    answer = scoring_server.invocations(payload, "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    assert answer.status == 200, answer.response
    served = np.asarray(json.loads(answer.response)["predictions"])
    assert served.shape == (1, 2) and int(np.argmax(served)) == 0
    np.testing.assert_allclose(served, out[:1, :2], atol=1e-5)

    # Retrained on the same data, the recipe gives the same model: it is registered, tagged with why, and does
    # not displace the champion on a tie (the gate scores the champion with its own head on the same embeddings).
    again = train_and_register(settings, progress=False)
    assert not again.decision.promote
    assert again.version == "2"
    assert "does not beat champion v1" in again.decision.reason
    assert again.metrics["test_accuracy"] == first.metrics["test_accuracy"]
    assert again.metrics["test_roc_auc"] == first.metrics["test_roc_auc"]
    assert again.embed_seconds == 0.0, "no embedding computed twice"
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


@pytest.mark.parametrize(
    ("accuracy", "auc", "promote"),
    [
        (0.95, 0.9, False),  # better by 0.02: not by the 0.03 asked
        (0.9601, 0.9, True),  # better by just over 0.03
        (0.93, 0.99, False),  # a tie: the ROC AUC tie-break is for min_gain 0 only
        (0.92, 0.99, False),
    ],
)
def test_gate_with_a_minimum_gain(accuracy, auc, promote) -> None:
    decision = decide(accuracy, auc, champion(0.93), floor=0.8, min_gain=0.03, force=False)
    assert decision.promote is promote, decision.reason


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("accuracy", [0.5, 0.95, 0.91])
def test_every_gate_decision_names_the_champion_it_was_measured_against(accuracy: float, force: bool) -> None:
    decision = decide(accuracy, 0.9, champion(0.93), floor=0.8, min_gain=0.0, force=force)
    assert (decision.champion_version, decision.champion_accuracy) == ("3", 0.93), decision
    first = decide(accuracy, 0.9, None, floor=0.8, min_gain=0.0, force=force)
    assert (first.champion_version, first.champion_accuracy) == (None, None)


def test_gate_boundaries_and_reasons() -> None:
    assert decide(0.8, 0.9, None, floor=0.8, min_gain=0.0, force=False).promote  # the floor itself passes
    assert decide(0.5, 0.5, None, floor=0.8, min_gain=0.0, force=True).reason == "forced by the operator (--force)"
    at_margin = champion(0.93, 0.9).roc_auc + AUC_TIE_BREAK_MARGIN
    assert not decide(0.93, at_margin, champion(0.93, 0.9), floor=0.8, min_gain=0.0, force=False).promote
    assert decide(0.93, at_margin + 1e-9, champion(0.93, 0.9), floor=0.8, min_gain=0.0, force=False).promote
    rejected = decide(0.91, 0.95, champion(0.93, 0.9), floor=0.8, min_gain=0.0, force=False).reason
    assert rejected == (
        "does not beat champion v3 on the same test split: accuracy 0.9100 vs 0.9300, ROC AUC 0.9500 vs 0.9000"
    )
    below = decide(0.7, 0.9, champion(0.93), floor=0.8, min_gain=0.0, force=False).reason
    assert below == "test accuracy 0.7000 is below the floor 0.8000"


def test_trainer_promotion_min_gain_reaches_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRAINER_PROMOTION_MIN_GAIN is what the gate is given (services.trainer.train passes the setting)."""
    monkeypatch.setenv("TRAINER_PROMOTION_MIN_GAIN", "0.05")
    settings = TrainerSettings()
    assert settings.promotion_min_gain == 0.05
    gain_of_004 = decide(0.97, 0.9, champion(0.93), settings.promotion_floor, settings.promotion_min_gain, False)
    assert not gain_of_004.promote
    monkeypatch.delenv("TRAINER_PROMOTION_MIN_GAIN")
    default = TrainerSettings()
    assert decide(0.97, 0.9, champion(0.93), default.promotion_floor, default.promotion_min_gain, False).promote
