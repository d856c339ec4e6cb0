"""Train a CNN on a feature set, log everything to one MLflow run, register the model and apply the gate.

``train_and_register`` is a function that returns a result: one run per call, the model registered only
when training and evaluation succeeded, the alias moved only on evidence (see :mod:`registry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from services.trainer import evaluation
from services.trainer.dataset import splits_from_table
from services.trainer.features import load_feature_set
from services.trainer.registry import Champion, GateDecision, connect, current_champion, decide, evaluate_version
from services.trainer.settings import TrainerSettings
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import Reference
from shared.images import MODEL_SIZE
from shared.labels import LABELS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_id: str
    model_name: str
    version: str
    feature_set_version: int
    metrics: dict[str, float]
    decision: GateDecision
    epochs: int
    seconds_per_epoch: float
    training_seconds: float
    total_seconds: float

    def summary(self) -> str:
        verdict = "PROMOTED to champion" if self.decision.promote else "NOT promoted"
        return (
            f"train: {self.model_name} v{self.version} (run {self.run_id[:8]}, "
            f"feature set v{self.feature_set_version}): "
            f"test accuracy {self.metrics['test_accuracy']:.4f}, F1 {self.metrics['test_f1']:.4f}, "
            f"ROC AUC {self.metrics['test_roc_auc']:.4f}; {self.epochs} epochs, "
            f"{self.seconds_per_epoch:.1f} s/epoch, {self.training_seconds:.0f} s training, "
            f"{self.total_seconds:.0f} s total\n"
            f"gate: {verdict}: {self.decision.reason}"
        )


def _pip_requirements() -> list[str]:
    """Exact versions of what loading the model needs (MLflow's own inference of them takes seconds)."""
    names = ["mlflow", "numpy", "keras"]
    for tf_name in ("tensorflow-cpu", "tensorflow"):
        try:
            metadata.version(tf_name)
        except metadata.PackageNotFoundError:
            continue
        names.append(tf_name)
        break
    return [f"{name}=={metadata.version(name)}" for name in names]


def _one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(len(LABELS), dtype=np.float32)[y]


def _predict(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Forward passes by direct call (``model.predict`` is slower and unnecessary here)."""
    import keras

    if not len(x):
        return np.zeros((0, len(LABELS)), np.float32)
    return np.concatenate(
        [keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    )


def train_and_register(
    settings: TrainerSettings,
    feature_set_version: int | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    started = time.perf_counter()
    feature_set, table = asyncio.run(load_feature_set(settings, feature_set_version))
    data = splits_from_table(table)
    train, val, test = data["train"], data["val"], data["test"]
    if min(len(train), len(val), len(test)) == 0:
        raise ValueError(f"feature set v{feature_set.version} has an empty split: {feature_set.split_counts}")

    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from services.trainer.model import build_network, serving_model

    reference = drift_reference(table, f"{feature_set.name}:v{feature_set.version}")

    client = connect(settings.registry)
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()

    params = {
        "seed": settings.seed,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "image_size": settings.image_size,
        "input_size": MODEL_SIZE,
        "patience": settings.patience,
        "tta": settings.tta,
        "optimizer": "AdamW",
        "weight_decay": 1e-4,
        "label_smoothing": 0.1,
        "lr_schedule": "cosine with 2-epoch warm-up",
        "labels": ",".join(LABELS),
        "feature_set_name": feature_set.name,
        "feature_set_version": feature_set.version,
        "feature_set_object_key": feature_set.object_key,
        "feature_set_snapshot": feature_set.source_snapshot,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
    }

    with mlflow.start_run(run_name=f"train-fs{feature_set.version}-seed{settings.seed}") as run:
        mlflow.log_params(params)
        mlflow.set_tags({"feature_set": f"{feature_set.name}:v{feature_set.version}", "trainer": "services.trainer"})

        network = build_network(settings.image_size, settings.seed)
        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, steps_per_epoch * settings.epochs - 2 * steps_per_epoch),
            warmup_target=settings.learning_rate,
            warmup_steps=2 * steps_per_epoch,
        )
        network.compile(
            optimizer=keras.optimizers.AdamW(schedule, weight_decay=params["weight_decay"]),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=params["label_smoothing"]),
            metrics=["accuracy"],
        )
        epoch_seconds: list[float] = []

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs=None) -> None:
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs=None) -> None:
                epoch_seconds.append(time.perf_counter() - self._t)
                values = {k: float(v) for k, v in (logs or {}).items()}
                values["epoch_seconds"] = epoch_seconds[-1]
                values["learning_rate"] = float(keras.ops.convert_to_numpy(schedule(self.model.optimizer.iterations)))
                mlflow.log_metrics(values, step=epoch)

        fit_started = time.perf_counter()
        history = network.fit(
            train.x,
            _one_hot(train.y),
            validation_data=(val.x, _one_hot(val.y)),
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            shuffle=True,
            verbose=2 if progress else 0,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=settings.patience, restore_best_weights=True
                ),
                EpochLogger(),
            ],
        )
        training_seconds = time.perf_counter() - fit_started

        exported = serving_model(network, tta=settings.tta)
        test_probs = _predict(exported, test.x)
        results = evaluation.metrics(test.y, test_probs)
        results.update(evaluation.metrics(val.y, _predict(exported, val.x), prefix="val_final_"))
        results["training_seconds"] = training_seconds
        results["epochs_run"] = len(epoch_seconds)
        results["seconds_per_epoch"] = float(np.mean(epoch_seconds))
        mlflow.log_metrics(results)

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            evaluation.plot_confusion(test.y, test_probs.argmax(axis=1), out / "confusion_matrix.png")
            evaluation.plot_history(history.history, out / "learning_curves.png")
            n_wrong = evaluation.misclassified_grid(
                test.image, test.y, test_probs, out / "misclassified_test_images.png"
            )
            (out / "labels.json").write_text(json.dumps(list(LABELS)))
            (out / "history.json").write_text(
                json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()})
            )
            mlflow.log_artifacts(tmp, artifact_path="report")
            mlflow.log_dict({"labels": list(LABELS)}, "labels.json")
            mlflow.log_dict(reference.to_dict(), "drift_reference.json")
        log.info("test accuracy %.4f (%d misclassified of %d)", results["test_accuracy"], n_wrong, len(test))

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, MODEL_SIZE, MODEL_SIZE, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(LABELS)))]),
        )
        from services.trainer.export import LITERT_FILE, litert_model

        with tempfile.TemporaryDirectory() as export_dir:
            litert_path = Path(export_dir) / LITERT_FILE  # the API's runtime: LiteRT, without TensorFlow
            litert_path.write_bytes(litert_model(exported))
            model_info = mlflow.tensorflow.log_model(
                exported,
                name="model",
                signature=signature,
                input_example=np.round(test.x[:1], 4),
                pip_requirements=_pip_requirements(),
                extra_files=[str(litert_path)],
                metadata={
                    "labels": list(LABELS),
                    "input_size": MODEL_SIZE,
                    "image_size": settings.image_size,
                    "tta": settings.tta,
                    "feature_set": f"{feature_set.name}:v{feature_set.version}",
                    "drift_reference": reference.to_dict(),
                },
                registered_model_name=settings.registry.model_name,
            )
        version = str(model_info.registered_model_version)

        decision = _gate(client, settings, version, test.x, test.y, results, force)
        mlflow.set_tags({"gate.promoted": str(decision.promote).lower(), "gate.reason": decision.reason})
        if decision.champion_accuracy is not None:
            mlflow.log_metric("champion_test_accuracy", decision.champion_accuracy)

    return TrainResult(
        run_id=run.info.run_id,
        model_name=settings.registry.model_name,
        version=version,
        feature_set_version=feature_set.version,
        metrics=results,
        decision=decision,
        epochs=len(epoch_seconds),
        seconds_per_epoch=float(np.mean(epoch_seconds)),
        training_seconds=training_seconds,
        total_seconds=time.perf_counter() - started,
    )


def drift_reference(table, source: str) -> Reference:
    """Decile bins of each descriptor over the training split: what the API compares live inputs with."""
    train = table.filter(pc.equal(table["split"], "train"))
    return Reference.build({name: train[name].to_numpy() for name in DESCRIPTOR_COLUMNS}, f"{source} train split")


def _gate(client, settings: TrainerSettings, version: str, x_test, y_test, results, force: bool) -> GateDecision:
    registry = settings.registry
    name = registry.model_name
    client.set_model_version_tag(name, version, "test_accuracy", f"{results['test_accuracy']:.4f}")
    client.set_model_version_tag(name, version, "labels", ",".join(LABELS))
    champion = None
    current = current_champion(client, registry)
    if current is not None and current[0] != version:
        probs = evaluate_version(registry, current[0], x_test)
        champ = evaluation.metrics(y_test, probs)
        champion = Champion(current[0], current[1], champ["test_accuracy"], champ["test_roc_auc"])
    decision = decide(
        results["test_accuracy"],
        results["test_roc_auc"],
        champion,
        settings.promotion_floor,
        settings.promotion_min_gain,
        force,
    )
    client.set_model_version_tag(name, version, "gate", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(name, version, "gate_reason", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, registry.model_alias, version)
        log.info("alias %s -> %s v%s: %s", registry.model_alias, name, version, decision.reason)
    else:
        log.info("alias %s unchanged: %s", registry.model_alias, decision.reason)
    return decision
