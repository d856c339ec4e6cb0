"""Train the classifier on a feature set, log everything to one MLflow run, register the model, apply the gate.

The recipe (chosen by cross-validation on the photos of both sources; docs/model.md): the pretrained, frozen
EfficientNet-Lite backbone turns each photo and its mirror image into 1280 features, computed once per image and
kept in the embedding store (:mod:`embeddings`), and a multinomial logistic regression (:mod:`head`) learns the two
classes and every kind of photo to refuse from them; its two-class answer is calibrated (:mod:`calibration`), and
an in-domain bank and thresholds say when a photo is neither (:mod:`indomain`).

:func:`train_and_register` is a short sequence of named steps (load, embed, fit, evaluate, log, register, gate),
one MLflow run per call: the model is registered only when training and evaluation succeeded, and the alias moves
only on evidence (:mod:`registry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from services.trainer import crosssource, crossval, dataset, estimates, evaluation, indomain, oodset, shards
from services.trainer.crosssource import CrossSource
from services.trainer.dataset import TrainingData
from services.trainer.estimates import Estimates
from services.trainer.extractor import TRAINING_VIEWS, Extractor
from services.trainer.features import load_feature_set
from services.trainer.head import SoftmaxHead
from services.trainer.registry import (
    HEAD_ARTIFACT,
    Champion,
    GateDecision,
    champion_head,
    connect,
    current_champion,
    decide,
    evaluate_version,
)
from services.trainer.settings import TrainerSettings
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import Reference
from shared.images import MODEL_SIZE, preprocess
from shared.labels import LABELS, NEITHER
from shared.quiet import filtered_stderr
from shared.storage import open_store
from shared.tables import FeatureSetRow

log = logging.getLogger(__name__)

EXPORT_CHECK_PHOTOS = 16
"""Test photos the served network (its whole forward pass) is checked against the head on before registering."""


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_name: str
    version: str
    feature_set_version: int
    metrics: dict[str, float]
    decision: GateDecision
    estimates: Estimates
    cross_source: CrossSource
    c: float
    """The head's inverse regularisation, chosen by cross-validation on the training split."""
    embed_seconds: float
    training_seconds: float
    total_seconds: float
    n_test: int = 0
    artifact_uri: str = ""
    tracking_uri: str = ""
    experiment_id: str = ""

    def summary(self) -> str:
        """The run's story in a few lines: the gate's verdict, the figures, and where to look."""
        n_test = self.n_test
        correct = round(self.metrics["test_accuracy"] * n_test) if n_test else None
        on_test = f" ({correct}/{n_test})" if correct is not None else ""
        if self.decision.promote:
            verdict = f"gate: v{self.version} is now the champion: {self.decision.reason}"
        else:
            verdict = f"gate: v{self.version} NOT promoted, the champion stays: {self.decision.reason}"
        est = self.estimates
        lines = [
            verdict,
            f"done: {self.model_name} v{self.version} from feature set v{self.feature_set_version} in "
            f"{self.total_seconds:.0f} s: test accuracy {self.metrics['test_accuracy']:.1%}{on_test}, "
            f"cross-validated {est.mean:.1%} ± {est.sd:.1%}, {est.flagged:.1%} of real photos flagged neither",
            f"  run      {self.run_id}",
        ]
        if self.artifact_uri:
            lines.append(f"  reports  {_readable(self.artifact_uri)}/report/ (model card, reliability, errors, ...)")
        if self.tracking_uri:
            lines.append(f"  browse   {_browse_hint(self.tracking_uri, self.experiment_id, self.run_id)}")
        return "\n".join(lines)


def _readable(uri: str) -> str:
    """A local artifact location as a path relative to here when it is under it."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if uri.startswith("/"):
        try:
            return str(Path(uri).relative_to(Path.cwd()))
        except ValueError:
            return uri
    return uri


def _browse_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f".venv/bin/mlflow ui --backend-store-uri {tracking_uri}   then http://127.0.0.1:5000/{page}"


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


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"train: {text}", flush=True)


# ---------------------------------------------------------------- the steps


def load(
    settings: TrainerSettings, feature_set_version: int | None, progress: bool
) -> tuple[FeatureSetRow, TrainingData, float]:
    """The feature set, its embeddings computed where missing (embed), as arrays; and the seconds embedding took."""
    feature_set, table = asyncio.run(load_feature_set(settings, feature_set_version))
    started = time.perf_counter()
    report = shards.embed(
        settings, feature_set.version, workers=settings.embed_workers or os.cpu_count() or 1, progress=progress
    )
    embed_seconds = time.perf_counter() - started if report.todo else 0.0
    if report.todo:
        _say(progress, report.summary().removeprefix("embed: "))
    data = dataset.load_sync(settings, table, shards.spec_of(settings))
    for split in ("train", "val", "test"):
        if not data.served[data.where(split)].any():
            raise ValueError(f"feature set v{feature_set.version} has no dandelion or grass photo in its {split} split")
    return feature_set, data, embed_seconds


def out_of_domain_features(settings: TrainerSettings) -> tuple[list[str], np.ndarray]:
    """The out-of-domain evaluation set (:mod:`oodset`) through the extractor."""
    names, files, _ = oodset.ensure(settings.ood_set)
    flatbuffer = asyncio.run(shards.ensure_extractor(settings))
    with filtered_stderr():
        extractor = Extractor(flatbuffer, os.cpu_count() or 1)
    return names, extractor.many(np.stack([preprocess(data) for data in files]))


@dataclass(frozen=True)
class Fitted:
    head: SoftmaxHead
    c: float
    curve: dict[float, float]
    domain: indomain.DomainModel
    estimates: Estimates
    cross_source: CrossSource
    learning: list[crossval.LearningPoint]
    seconds: float


def fit(settings: TrainerSettings, data: TrainingData, ood_names: list[str], ood: np.ndarray, progress: bool) -> Fitted:
    """Choose C, cross-validate everything, fit the head, calibrate it, set the in-domain thresholds."""
    started = time.perf_counter()
    the_plan = crossval.plan(len(data), settings.cv_folds, settings.cv_repeats)
    _say(progress, f"judging the recipe by {the_plan.describe()}")
    sample = crossval.sample_index(data)
    train = data.where("train")
    chooser = np.intersect1d(train, sample)
    c, curve = crossval.choose_c(data, chooser, settings.head_c_grid, settings.cv_folds, settings.seed)
    oof = crossval.out_of_fold(data, ood, the_plan, settings.head_c_grid, c, settings.seed, settings.domain_k)
    fitted = crossval.fit_head(data, train, c)
    served_train = train[data.served[train]]
    val = data.where("val")
    served_val = val[data.served[val]]
    domain = indomain.fit(
        data.views[:, served_train],
        data.group[served_train],
        data.views[0, served_val],
        estimates.neither_held_out(data, oof),
        data.kinds,
        settings.domain_k,
        seed=settings.seed,
    )
    figures = estimates.estimate(data, oof, the_plan, domain.neither_threshold, ood_names)
    fitted = fitted.calibrated(figures.calibration.scale, figures.calibration.shift)
    cross = crosssource.estimate(data, sample, c, domain.neither_threshold, settings.seed)
    learning = crossval.learning_curve(data, sample, c, settings.cv_folds, settings.seed)
    seconds = time.perf_counter() - started
    more_data = ", ".join(f"{p.photos:,} photos {p.accuracy:.1%}" for p in learning)
    for line in (f"head C={c:g} (chosen on the training split)", *figures.summary(), cross.summary(),
                 f"learning curve (cross-validated): {more_data}"):  # fmt: skip
        _say(progress, line)
    return Fitted(fitted, c, curve, domain, figures, cross, learning, seconds)


def test_metrics(data: TrainingData, fitted: Fitted) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Test-split figures (the gate's), from the embeddings; and the test photos of the two classes with their
    served probabilities."""
    results: dict[str, float] = {}
    for split, prefix in (("test", "test_"), ("val", "val_final_")):
        index = data.where(split)
        served = index[data.served[index]]
        probs = fitted.head.probabilities(data.views[0, served])
        results.update(evaluation.metrics(data.y[served], probs, prefix=prefix))
        refused = index[~data.served[index]]
        if len(refused):
            flags = fitted.domain.flagged(
                fitted.domain.distances(data.views[0, refused]), fitted.head.neither(data.views[0, refused])
            )
            results[f"{prefix}neither_caught"] = float(flags.mean())
        if split == "test":
            test, test_probs = served, probs
    first = data.views[0, test]
    flags = fitted.domain.flagged(fitted.domain.distances(first), fitted.head.neither(first))
    results["domain_test_flagged"] = float(flags.mean())
    return results, test, test_probs


def photos_of(settings: TrainerSettings, data: TrainingData, index: np.ndarray) -> list[bytes]:
    async def read() -> list[bytes]:
        async with open_store(settings.store) as store:
            return list(await asyncio.gather(*(store.get(data.object_key[i]) for i in index)))

    return asyncio.run(read())


def drift_reference(table, source: str) -> Reference:
    """Decile bins of each descriptor over the training split's photos of the two classes in a feature set's table
    (or its :class:`TrainingData`): what the API compares live inputs with. The photos of kinds the model refuses
    (daisies, roses, ...) are left out: they are what the model is taught to turn away, not what it expects."""
    if isinstance(table, TrainingData):
        train = (table.split == "train") & table.served
        columns = {name: table.descriptors[name][train] for name in DESCRIPTOR_COLUMNS}
    else:
        split, label = np.array(table["split"].to_pylist()), np.array(table["label"].to_pylist())
        train = (split == "train") & np.isin(label, LABELS)
        columns = {name: table[name].to_numpy()[train] for name in DESCRIPTOR_COLUMNS}
    return Reference.build(columns, f"{source} train split")


# ---------------------------------------------------------------- the run


def train_and_register(
    settings: TrainerSettings,
    feature_set_version: int | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Load, embed, fit, evaluate, export, log, register, gate: one MLflow run."""
    started = time.perf_counter()
    feature_set, data, embed_seconds = load(settings, feature_set_version, progress)
    from shared.quiet import import_tensorflow

    import_tensorflow()
    import keras
    import mlflow

    client = connect(settings.registry)
    keras.utils.set_random_seed(settings.seed)
    params = _params(settings, feature_set, data)
    with mlflow.start_run(run_name=f"train-fs{feature_set.version}-seed{settings.seed}") as run:
        mlflow.log_params(params)
        mlflow.set_tags({"feature_set": f"{feature_set.name}:v{feature_set.version}", "trainer": "services.trainer"})
        ood_names, ood = out_of_domain_features(settings)
        fitted = fit(settings, data, ood_names, ood, progress)
        results, test, test_probs = evaluate(data, fitted, embed_seconds)
        mlflow.log_metrics(results)
        export = build_export(settings, data, test, fitted)
        _say(progress, f"test split {results['test_accuracy']:.1%}; registering the model and its LiteRT export")
        reference = drift_reference(data, f"{feature_set.name}:v{feature_set.version}")
        _log_reports(settings, data, fitted, test, test_probs, ood_names, reference)
        model_metadata = _model_metadata(settings, feature_set, fitted, export, reference)
        model_info = _log_model(settings, export.served, export.flatbuffer, export.x_check[:1], model_metadata)
        version = str(model_info.registered_model_version)

        decision = _gate(client, settings, version, data, test, results, force, export.spec)
        mlflow.set_tags({"gate.promoted": str(decision.promote).lower(), "gate.reason": decision.reason})
        if decision.champion_accuracy is not None:
            mlflow.log_metric("champion_test_accuracy", decision.champion_accuracy)

        from services.trainer.modelcard import render

        card = render(settings, run.info.run_id, version, feature_set, data, fitted, results, decision, params)
        mlflow.log_text(card, "model_card.md")

    return TrainResult(
        run_id=run.info.run_id,
        model_name=settings.registry.model_name,
        version=version,
        feature_set_version=feature_set.version,
        metrics=results,
        decision=decision,
        estimates=fitted.estimates,
        cross_source=fitted.cross_source,
        c=fitted.c,
        embed_seconds=embed_seconds,
        training_seconds=fitted.seconds,
        total_seconds=time.perf_counter() - started,
        n_test=len(test),
        artifact_uri=run.info.artifact_uri or "",
        tracking_uri=mlflow.get_tracking_uri(),
        experiment_id=run.info.experiment_id,
    )


def _params(settings: TrainerSettings, feature_set, data: TrainingData) -> dict[str, object]:
    """The run's parameters: the recipe and the data it was trained on."""
    from services.trainer import backbone

    variant = backbone.VARIANTS[settings.backbone]
    counts = {cls: int(np.sum(data.y == i)) for i, cls in enumerate(data.classes)}
    return {
        "seed": settings.seed,
        "backbone": f"efficientnet-{variant.name}",
        "backbone_weights": f"{variant.package} ({variant.file}, sha256 {variant.sha256[:16]}…)",
        "pretrained_on": "ImageNet-1k",
        "backbone_frozen": True,
        "resolution": settings.resolution,
        "input_size": MODEL_SIZE,
        "embedding_spec": shards.spec_of(settings).key,
        "training_views": ", ".join(TRAINING_VIEWS),
        "head": "multinomial logistic regression on standardised pooled features (classes even, sources even)",
        "head_classes": ",".join(data.classes),
        "head_c_grid": ",".join(f"{c:g}" for c in settings.head_c_grid),
        "cv_folds": settings.cv_folds,
        "cv_repeats": settings.cv_repeats,
        "domain_k": settings.domain_k,
        "domain_bank_views": indomain.BANK_VIEWS,
        "labels": ",".join(LABELS),
        "feature_set_name": feature_set.name,
        "feature_set_version": feature_set.version,
        "feature_set_object_key": feature_set.object_key,
        "feature_set_snapshot": feature_set.source_snapshot,
        "origins": ",".join(sorted(set(data.origin.tolist()))),
        "photos_by_class": json.dumps(counts),
        "n_train": int(data.served[data.where("train")].sum()),
        "n_val": int(data.served[data.where("val")].sum()),
        "n_test": int(data.served[data.where("test")].sum()),
    }


def evaluate(
    data: TrainingData, fitted: Fitted, embed_seconds: float
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Every figure the run logs: the test split's (the gate's), the cross-validated estimates, the thresholds."""
    results, test, test_probs = test_metrics(data, fitted)
    results.update(fitted.estimates.metrics())
    results.update(fitted.cross_source.metrics())
    results["domain_threshold"] = fitted.domain.threshold
    if fitted.domain.neither_threshold is not None:
        results["domain_neither_threshold"] = fitted.domain.neither_threshold
    results.update({f"head_cv_accuracy_c{c:g}": accuracy for c, accuracy in fitted.curve.items()})
    results["head_c"] = fitted.c
    results["embed_seconds"] = embed_seconds
    results["training_seconds"] = fitted.seconds
    return results, test, test_probs


@dataclass(frozen=True)
class Export:
    served: object
    """The Keras network MLflow clients load (probabilities only)."""
    flatbuffer: bytes
    """Its LiteRT export with every column (:func:`services.trainer.export.outputs`)."""
    grid: int
    x_check: np.ndarray
    spec: str


def build_export(settings: TrainerSettings, data: TrainingData, test: np.ndarray, fitted: Fitted) -> Export:
    """The served network, built, checked against the head on real test photos, exported to LiteRT."""
    from services.trainer import backbone
    from services.trainer.export import litert_model
    from services.trainer.model import feature_map_model, feature_model, serving_model, traced

    variant = backbone.VARIANTS[settings.backbone]
    features = feature_model(backbone.build(variant, backbone.load_weights(variant, settings.backbone_weights)),
                             settings.resolution)  # fmt: skip
    served = serving_model(features, fitted.head)
    feature_map = feature_map_model(features)
    check = photos_of(settings, data, test[:EXPORT_CHECK_PHOTOS])
    x_check = np.stack([preprocess(photo) for photo in check])
    got, expected = traced(served)(x_check), fitted.head.probabilities(traced(features)(x_check))
    if not np.allclose(got, expected, atol=1e-4):  # the folded Dense layer must be the fitted head
        raise RuntimeError(f"the exported model differs from its head by {np.abs(got - expected).max():.3g}")
    with filtered_stderr():
        flatbuffer = litert_model(served, feature_map, fitted.head, fitted.domain, probe=x_check[:4])
    return Export(served, flatbuffer, int(feature_map.output_shape[1]), x_check, shards.spec_of(settings).key)


def _log_reports(
    settings: TrainerSettings,
    data: TrainingData,
    fitted: Fitted,
    test: np.ndarray,
    test_probs: np.ndarray,
    ood_names: list[str],
    reference: Reference,
) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _reports(settings, data, fitted, test, test_probs, ood_names, out)
        mlflow.log_artifacts(tmp, artifact_path="report")
        mlflow.log_dict({"labels": list(LABELS)}, "labels.json")
        mlflow.log_dict(reference.to_dict(), "drift_reference.json")
        np.savez(out / "head.npz", **fitted.head.to_arrays())
        mlflow.log_artifact(str(out / "head.npz"), artifact_path=HEAD_ARTIFACT.rsplit("/", 1)[0])


def _model_metadata(
    settings: TrainerSettings, feature_set, fitted: Fitted, export: Export, reference: Reference
) -> dict[str, object]:
    """What travels with the model: the label order, the export's columns, the thresholds, the drift reference."""
    from services.trainer import backbone
    from services.trainer.export import outputs

    variant = backbone.VARIANTS[settings.backbone]
    return {
        "labels": list(LABELS),
        "input_size": MODEL_SIZE,
        "backbone": f"efficientnet-{variant.name}",
        "resolution": settings.resolution,
        "embedding_spec": export.spec,
        "feature_set": f"{feature_set.name}:v{feature_set.version}",
        "cv_accuracy": round(fitted.estimates.mean, 4),
        "drift_reference": reference.to_dict(),
        "outputs": outputs(export.grid),
        "calibration": {
            "method": fitted.estimates.calibration.method,
            "temperature": fitted.estimates.calibration.temperature,
            "shift": fitted.estimates.calibration.shift,
            "ece_before": fitted.estimates.ece_before,
            "ece_after": fitted.estimates.ece_after,
        },
        "low_confidence_threshold": fitted.estimates.low_confidence_threshold,
        # The LiteRT export's columns after the probabilities; the API flags answers above the thresholds.
        "in_domain": {**fitted.domain.metadata(), "score_column": len(LABELS), "neither_column": len(LABELS) + 1},
    }


def _log_model(settings: TrainerSettings, served, flatbuffer: bytes, example: np.ndarray, meta: dict):
    import keras
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from services.trainer.export import LITERT_FILE

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, MODEL_SIZE, MODEL_SIZE, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(LABELS)))]),
    )
    with tempfile.TemporaryDirectory() as export_dir:
        litert_path = Path(export_dir) / LITERT_FILE  # the API's runtime: LiteRT, without TensorFlow
        litert_path.write_bytes(flatbuffer)
        keras.utils.disable_interactive_logging()  # MLflow's input-example check would draw Keras step bars
        with filtered_stderr():
            return mlflow.tensorflow.log_model(
                served,
                name="model",
                signature=signature,
                input_example=np.round(example, 4),
                pip_requirements=_pip_requirements(),
                extra_files=[str(litert_path)],
                metadata=meta,
                registered_model_name=settings.registry.model_name,
            )


def _reports(
    settings: TrainerSettings,
    data: TrainingData,
    fitted: Fitted,
    test: np.ndarray,
    test_probs: np.ndarray,
    ood_names: list[str],
    out: Path,
) -> None:
    """The run's report folder: pictures people look at and the figures behind them."""
    from services.trainer import calibration

    est = fitted.estimates
    evaluation.plot_confusion(data.y[test], test_probs.argmax(axis=1), out / "confusion_matrix.png")
    wrong = test[test_probs.argmax(axis=1) != data.y[test]][:24]
    photos = dict(zip(wrong.tolist(), photos_of(settings, data, wrong), strict=True))
    evaluation.misclassified_grid(
        [photos.get(int(i), b"") for i in test], data.y[test], test_probs, out / "misclassified_test_images.png"
    )
    calibration.plot(est.reliability_before, est.reliability_after, (est.ece_before, est.ece_after),
                     out / "reliability.png")  # fmt: skip
    evaluation.plot_learning_curve(fitted.learning, out / "learning_curve.png")
    (out / "labels.json").write_text(json.dumps(list(LABELS)))
    (out / "cross_validation.json").write_text(
        json.dumps(
            {
                "plan": est.plan.describe(),
                "folds": est.plan.folds,
                "repeats": est.plan.repeats,
                "photos": est.plan.photos,
                "fold_accuracies": est.fold_accuracies,
                "mean": est.mean,
                "sd": est.sd,
                "recall": est.recall,
                "by_group": est.by_group,
                "at_128_px": {"accuracy": est.small_accuracy, "recall": est.small_recall, "photos": est.small_photos},
                "chosen_c": est.chosen_c,
                "c_curve": {f"{c:g}": v for c, v in fitted.curve.items()},
                "learning_curve": [
                    {"training_photos": p.photos, "accuracy": p.accuracy, "sd": p.sd} for p in fitted.learning
                ],
                "calibration": {
                    "method": est.calibration.method,
                    "temperature": est.calibration.temperature,
                    "shift": est.calibration.shift,
                    "log_loss": est.calibration.log_loss,
                    "ece": [est.ece_before, est.ece_after],
                    "brier": [est.brier_before, est.brier_after],
                    "low_confidence_threshold": est.low_confidence_threshold,
                    "low_confidence_share": est.low_confidence_share,
                    "low_confidence_accuracy": est.low_confidence_accuracy,
                    "confident_accuracy": est.confident_accuracy,
                },
            },
            indent=2,
        )
    )
    (out / "cross_source.json").write_text(json.dumps(fitted.cross_source.to_dict(), indent=2))
    (out / "in_domain.json").write_text(
        json.dumps(
            {
                **fitted.domain.metadata(),
                "flagged": est.flagged,
                "flagged_by_group": est.flagged_by_group,
                "flagged_at_128_px": est.flagged_small,
                "refused_caught": est.caught_by_kind,
                "refused_caught_at_128_px": est.caught_small_by_kind,
                "refused_in_domain_and_sure": est.trusted_wrong_by_kind,
                "out_of_domain_caught": est.ood_caught,
                "out_of_domain_auroc": est.ood_auroc,
                "out_of_domain_images": est.ood_images,
                "missed_by_most_folds": list(est.ood_missed),
            },
            indent=1,
        )
    )


def _gate(
    client,
    settings: TrainerSettings,
    version: str,
    data: TrainingData,
    test: np.ndarray,
    results: dict[str, float],
    force: bool,
    spec_key: str,
) -> GateDecision:
    registry = settings.registry
    name = registry.model_name
    client.set_model_version_tag(name, version, "test_accuracy", f"{results['test_accuracy']:.4f}")
    client.set_model_version_tag(name, version, "labels", ",".join(LABELS))
    champion = None
    current = current_champion(client, registry)
    if current is not None and current[0] != version:
        head = champion_head(client, current[1], spec_key)
        if head is not None:  # the same embeddings: the champion's head answers from them
            probs = head.probabilities(data.views[0, test])
        else:
            probs = evaluate_version(registry, current[0], photos_of(settings, data, test))
        champ = evaluation.metrics(data.y[test], probs)
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
        log.debug("alias %s -> %s v%s: %s", registry.model_alias, name, version, decision.reason)
    else:
        log.debug("alias %s unchanged: %s", registry.model_alias, decision.reason)
    return decision


__all__ = ["NEITHER", "TrainResult", "train_and_register"]
