"""Train the classifier on a feature set, log everything to one MLflow run, register the model, apply the gate.

The recipe (chosen by cross-validation on the 320 photos; see the README): the pretrained, frozen
EfficientNet-Lite backbone (:mod:`backbone`) turns each photo and its mirror image into 1280 features,
and a logistic regression (:mod:`head`) learns the classes from them. Every run also cross-validates the
recipe on all the photos of its feature set (:mod:`crossval`), so the run shows an honest estimate beside
the small test split's.

``train_and_register`` is a function that returns a result: one run per call, the model registered only
when training and evaluation succeeded, the alias moved only on evidence (see :mod:`registry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from services.trainer import backbone, crossval, evaluation, head, indomain, oodset
from services.trainer.crossval import CrossValidation
from services.trainer.dataset import splits_from_table
from services.trainer.features import load_feature_set
from services.trainer.quiet import filtered_stderr
from services.trainer.registry import Champion, GateDecision, connect, current_champion, decide, evaluate_version
from services.trainer.settings import TrainerSettings
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import Reference
from shared.images import MODEL_SIZE, preprocess
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
    cross_validation: CrossValidation
    domain: indomain.DomainEvaluation
    c: float
    """The head's inverse regularisation, chosen by cross-validation on the training split."""
    feature_seconds: float
    training_seconds: float
    total_seconds: float

    n_test: int = 0
    artifact_uri: str = ""
    tracking_uri: str = ""

    def summary(self) -> str:
        """The run's story in a few lines: the gate's verdict, the figures, and where to look."""
        n_test = self.n_test
        correct = round(self.metrics["test_accuracy"] * n_test) if n_test else None
        on_test = f" ({correct}/{n_test})" if correct is not None else ""
        if self.decision.promote:
            verdict = f"gate: v{self.version} is now the champion: {self.decision.reason}"
        else:
            verdict = f"gate: v{self.version} NOT promoted, the champion stays: {self.decision.reason}"
        lines = [
            verdict,
            f"done: {self.model_name} v{self.version} from feature set v{self.feature_set_version} in "
            f"{self.total_seconds:.0f} s: test accuracy {self.metrics['test_accuracy']:.1%}{on_test}, "
            f"cross-validated {self.cross_validation.mean:.1%} ± {self.cross_validation.sd:.1%}",
            f"  run      {self.run_id}",
        ]
        if self.artifact_uri:
            where = _readable(self.artifact_uri)
            lines.append(f"  reports  {where}/report/ (confusion matrix, errors, cross-validation)")
        if self.tracking_uri:
            lines.append(f"  browse   {_browse_hint(self.tracking_uri)}")
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


def _browse_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')} (MLflow UI: the run, its plots and the registered model)"
    return f"mlflow ui --backend-store-uri {tracking_uri}   (then http://127.0.0.1:5000)"


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


def _views(extract, x: np.ndarray) -> np.ndarray:
    """Pooled features of each photo and of its mirror image: ``(n, 2, 1280)``."""
    return np.stack([extract(x), extract(np.ascontiguousarray(x[:, :, ::-1]))], axis=1)


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
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from services.trainer.model import extractor, feature_model, serving_models, traced

    reference = drift_reference(table, f"{feature_set.name}:v{feature_set.version}")
    variant = backbone.VARIANTS[settings.backbone]
    weights = backbone.load_weights(variant, settings.backbone_weights)  # checksum first, then a safe unpickle
    client = connect(settings.registry)
    keras.utils.set_random_seed(settings.seed)
    eval_views = 2 if settings.tta else 1

    params = {
        "seed": settings.seed,
        "backbone": f"efficientnet-{variant.name}",
        "backbone_weights": f"{variant.package} ({variant.file}, sha256 {variant.sha256[:16]}…)",
        "pretrained_on": "ImageNet-1k",
        "backbone_frozen": True,
        "resolution": settings.resolution,
        "input_size": MODEL_SIZE,
        "tta": settings.tta,
        "training_views": "photo, mirror image",
        "head": "logistic regression on standardised pooled features",
        "head_c_grid": ",".join(f"{c:g}" for c in settings.head_c_grid),
        "cv_folds": settings.cv_folds,
        "cv_repeats": settings.cv_repeats,
        "domain_k": settings.domain_k,
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

        features = feature_model(backbone.build(variant, weights), settings.resolution)
        feature_started = time.perf_counter()
        extract = extractor(features)
        views = {name: _views(extract, split.x) for name, split in data.items()}
        feature_seconds = time.perf_counter() - feature_started
        mlflow.log_metric("feature_seconds", feature_seconds)
        if progress:
            print(
                f"train: features of {sum(len(s) for s in data.values())} photos and their mirror images at "
                f"{settings.resolution} px in {feature_seconds:.0f} s",
                flush=True,
            )

        fit_started = time.perf_counter()
        c, curve = head.choose_c(
            views["train"], train.y, settings.head_c_grid, settings.cv_folds, settings.seed, eval_views
        )
        fitted = head.fit(views["train"], train.y, c)
        everything = np.concatenate([views[name] for name in ("train", "val", "test")])
        labels = np.concatenate([train.y, val.y, test.y])
        cv = crossval.cross_validate(
            everything,
            labels,
            folds=settings.cv_folds,
            seed=settings.seed,
            grid=settings.head_c_grid,
            eval_views=eval_views,
            repeats=settings.cv_repeats,
        )
        training_seconds = time.perf_counter() - fit_started
        if progress:
            print(f"train: head C={c:g} (chosen by cross-validation on the training split); {cv.summary()}", flush=True)

        # "Neither": the bank and threshold this version carries, and how well the recipe tells other images.
        domain = indomain.fit(views["train"], views["val"], settings.domain_k, settings.seed)
        ood_names, ood_files, _ = oodset.ensure(settings.ood_set)
        ood_features = extract(np.stack([preprocess(data) for data in ood_files]))
        domain_eval = indomain.evaluate(
            everything, labels, ood_features, ood_names, settings.domain_k, settings.cv_folds, settings.seed
        )
        if progress:
            print(f"train: {domain_eval.summary()}; threshold {domain.threshold:.4f}", flush=True)

        exported, with_features = serving_models(features, fitted, tta=settings.tta)
        test_probs = traced(exported)(test.x)
        expected = head.predict(fitted, views["test"][:, :eval_views])
        if not np.allclose(test_probs, expected, atol=1e-4):  # the folded Dense layer must be the fitted head
            raise RuntimeError(f"the exported model differs from its head by {np.abs(test_probs - expected).max():.3g}")
        results = evaluation.metrics(test.y, test_probs)
        results.update(
            evaluation.metrics(val.y, head.predict(fitted, views["val"][:, :eval_views]), prefix="val_final_")
        )
        results.update(cv.metrics())
        results.update(domain_eval.metrics())
        results["domain_threshold"] = domain.threshold
        results["domain_test_flagged"] = float(np.mean(domain.distances(views["test"][:, 0]) > domain.threshold))
        results.update({f"head_cv_accuracy_c{c_value:g}": accuracy for c_value, accuracy in curve.items()})
        results["head_c"] = c
        results["training_seconds"] = training_seconds
        mlflow.log_metrics(results)

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            evaluation.plot_confusion(test.y, test_probs.argmax(axis=1), out / "confusion_matrix.png")
            evaluation.plot_regularisation(curve, c, cv, out / "regularisation.png")
            n_wrong = evaluation.misclassified_grid(
                test.image, test.y, test_probs, out / "misclassified_test_images.png"
            )
            (out / "labels.json").write_text(json.dumps(list(LABELS)))
            (out / "cross_validation.json").write_text(
                json.dumps(
                    {
                        "folds": cv.folds,
                        "repeats": cv.repeats,
                        "photos": cv.photos,
                        "fold_accuracies": cv.fold_accuracies,
                        "mean": cv.mean,
                        "sd": cv.sd,
                        "recall": cv.recall,
                        "chosen_c": cv.chosen_c,
                    },
                    indent=2,
                )
            )
            ood_distances = domain.distances(ood_features)
            (out / "in_domain.json").write_text(
                json.dumps(
                    {
                        **domain.metadata(),
                        **domain_eval.metrics(),
                        "missed_by_most_folds": list(domain_eval.missed),
                        "out_of_domain_set": {
                            name: {"distance": round(float(d), 4), "caught": bool(d > domain.threshold)}
                            for name, d in zip(ood_names, ood_distances, strict=True)
                        },
                    },
                    indent=1,
                )
            )
            mlflow.log_artifacts(tmp, artifact_path="report")
            mlflow.log_dict({"labels": list(LABELS)}, "labels.json")
            mlflow.log_dict(reference.to_dict(), "drift_reference.json")
        if progress:
            print(
                f"train: test split {results['test_accuracy']:.1%} ({len(test) - n_wrong}/{len(test)}); "
                "registering the model and its LiteRT export",
                flush=True,
            )

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, MODEL_SIZE, MODEL_SIZE, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(LABELS)))]),
        )
        from services.trainer.export import LITERT_FILE, litert_model

        with tempfile.TemporaryDirectory() as export_dir:
            litert_path = Path(export_dir) / LITERT_FILE  # the API's runtime: LiteRT, without TensorFlow
            with filtered_stderr():
                litert_path.write_bytes(litert_model(exported, with_features=with_features, domain=domain))
            keras.utils.disable_interactive_logging()  # MLflow's input-example check would draw Keras step bars
            with filtered_stderr():
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
                        "backbone": f"efficientnet-{variant.name}",
                        "resolution": settings.resolution,
                        "tta": settings.tta,
                        "feature_set": f"{feature_set.name}:v{feature_set.version}",
                        "cv_accuracy": round(cv.mean, 4),
                        "drift_reference": reference.to_dict(),
                        # The LiteRT export's last output column; the API flags answers above the threshold.
                        "in_domain": {**domain.metadata(), "score_column": len(LABELS)},
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
        cross_validation=cv,
        domain=domain_eval,
        c=c,
        feature_seconds=feature_seconds,
        training_seconds=training_seconds,
        total_seconds=time.perf_counter() - started,
        n_test=len(test),
        artifact_uri=run.info.artifact_uri or "",
        tracking_uri=mlflow.get_tracking_uri(),
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
        log.debug("alias %s -> %s v%s: %s", registry.model_alias, name, version, decision.reason)
    else:
        log.debug("alias %s unchanged: %s", registry.model_alias, decision.reason)
    return decision
