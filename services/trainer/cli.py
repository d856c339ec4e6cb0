"""python -m services.trainer ingest|features|embed|train|run|drift|prune: the training worker's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from services.trainer.dataset import DatasetError
from services.trainer.drift import DriftError
from services.trainer.features import FeatureSetError, build_features
from services.trainer.ingest import SourceError, ingest, ingest_feedback
from services.trainer.settings import TrainerSettings
from services.trainer.shards import EmbedError
from shared.db import DatabaseError
from shared.storage import ObjectStoreError

EXPECTED_ERRORS = (SourceError, FeatureSetError, ObjectStoreError, DatabaseError, DriftError, EmbedError, DatasetError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer",
        description="The training worker: ingest labelled photos, build feature sets, train, register and gate "
        "models. Settings are environment variables (DATABASE_URL, OBJECT_STORE_URL, MLFLOW_TRACKING_URI, "
        "TRAINER_*; see the README); the defaults keep everything under ./var/.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress lines or bars, only the summaries")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_source(p: argparse.ArgumentParser, feedback_help: str) -> None:
        p.add_argument(
            "--source",
            action="append",
            metavar="[NAME=]SOURCE",
            help="a folder with dandelion/ and grass/ subfolders (others: photos of neither) or an HTTP(S) base; "
            "repeat for several (default: DATA_SOURCE)",
        )
        p.add_argument(
            "--per-class",
            type=int,
            help="indices per label to try (HTTP); a limit per subfolder (folder: all by default)",
        )
        p.add_argument("--from-feedback", action="store_true", help=feedback_help)

    add_source(
        commands.add_parser("ingest", parents=[common], help="download/copy labelled images into the object store"),
        "ingest the uploads users labelled through POST /feedback instead (and --source too, if given)",
    )
    features = commands.add_parser("features", parents=[common], help="build the next feature-set version")
    features.add_argument("--force", action="store_true", help="build a new version even if nothing changed")
    embed = commands.add_parser(
        "embed", parents=[common], help="compute the backbone embeddings the feature set lacks (in shards)"
    )
    embed.add_argument("--feature-set", type=int, help="feature-set version (default: latest)")
    embed.add_argument(
        "--shard", type=int, help="compute only part I of --shards (default: JOB_COMPLETION_INDEX, else all)"
    )
    embed.add_argument("--shards", type=_positive, default=1, help="parts the work is split into")
    embed.add_argument(
        "--workers", type=_positive, help="run the parts as N local processes (default: TRAINER_EMBED_WORKERS)"
    )
    for name, help_text in (("train", "train, register and gate a model"), ("run", "ingest + features + train")):
        p = commands.add_parser(name, parents=[common], help=help_text)
        if name == "run":
            add_source(p, "also ingest the uploads users labelled through POST /feedback")
            p.add_argument(
                "--if-needed",
                action="store_true",
                help="after ingest, train only if there is no champion, the images changed or the inputs drifted",
            )
        else:
            p.add_argument("--feature-set", type=int, help="feature-set version (default: latest)")
        p.add_argument("--seed", type=int, help="override TRAINER_SEED (shuffles the cross-validation folds)")
        p.add_argument("--force", action="store_true", help="promote even if the quality gate says no")
    drift = commands.add_parser(
        "drift", parents=[common], help="compare the champion's training data with recent predictions"
    )
    drift.add_argument(
        "--window", type=_positive, help="how many of the latest predictions (default: TRAINER_DRIFT_WINDOW)"
    )
    drift.add_argument("--out", type=Path, default=Path("drift.png"), help="histogram grid PNG (default: drift.png)")
    prune = commands.add_parser(
        "prune", parents=[common], help="delete old predictions and their kept uploads (not those with feedback)"
    )
    prune.add_argument(
        "--older-than-days", type=float, help="default: TRAINER_PREDICTION_RETENTION_DAYS (90)", metavar="DAYS"
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The console tells one story (progress, the gate, a summary): the libraries' own chatter stays out of it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables...", ...
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    noisy_libraries = ("botocore", "aiobotocore", "httpx", "urllib3", "alembic", "mlflow", "absl", "tensorflow")
    for noisy in (*noisy_libraries, "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = TrainerSettings()
    if getattr(args, "seed", None) is not None:
        settings = settings.model_copy(update={"seed": args.seed})
    progress = not args.quiet
    try:
        if args.command == "drift":
            return _drift(settings, args.window, args.out)
        if args.command == "prune":
            from services.trainer.retention import prune_predictions

            print(asyncio.run(prune_predictions(settings, args.older_than_days)).summary())
            return 0
        if args.command in ("ingest", "run"):
            if args.command == "run" or args.source or not args.from_feedback:
                report = asyncio.run(ingest(settings, args.source, args.per_class, progress=progress))
                print(report.summary())
            if args.from_feedback:
                print(asyncio.run(ingest_feedback(settings, progress=progress)).summary())
        if args.command == "run" and args.if_needed:
            from services.trainer.schedule import check

            decision = check(settings)
            print(decision.summary(), flush=True)
            if not decision.train:
                return 0
        if args.command in ("features", "run"):
            feature_set = asyncio.run(
                build_features(
                    settings, force=getattr(args, "force", False) and args.command == "features", progress=progress
                )
            )
            print(feature_set.summary())
        if args.command in ("embed", "run"):
            print(_embed(settings, args, progress).summary(), flush=True)
        if args.command in ("train", "run"):
            from shared.quiet import import_tensorflow

            import_tensorflow()
            from services.trainer.train import train_and_register

            version = getattr(args, "feature_set", None)
            result = train_and_register(settings, feature_set_version=version, force=args.force, progress=progress)
            print(result.summary())
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _embed(settings: TrainerSettings, args: argparse.Namespace, progress: bool):
    from services.trainer.shards import embed

    shard = getattr(args, "shard", None)
    if shard is None:
        shard = settings.shard_index if getattr(args, "shards", 1) > 1 else None
    shards = getattr(args, "shards", 1)
    if shard is not None and not 0 <= shard < shards:
        raise EmbedError(f"--shard {shard} is not one of the {shards} parts (0 to {shards - 1})")
    workers = getattr(args, "workers", None) or settings.embed_workers or os.cpu_count() or 1
    version = getattr(args, "feature_set", None)
    return embed(settings, version, shard=shard, shards=shards, workers=1 if shard is not None else workers,
                 progress=progress)  # fmt: skip


def _drift(settings: TrainerSettings, window: int | None, out: Path) -> int:
    from services.trainer.drift import drift_report

    report = drift_report(settings, window)
    print(report.table())
    print(f"drift: histograms written to {report.plot(out)}")
    return 0
