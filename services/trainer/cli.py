"""``python -m services.trainer ingest|features|train|run``: the training worker's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from services.trainer.features import FeatureSetError, build_features
from services.trainer.ingest import SourceError, ingest
from services.trainer.settings import TrainerSettings
from shared.db import DatabaseError
from shared.storage import ObjectStoreError

EXPECTED_ERRORS = (SourceError, FeatureSetError, ObjectStoreError, DatabaseError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", help="HTTP(S) base URL or local folder (default: DATA_SOURCE)")
        p.add_argument("--per-class", type=int, help="indices (HTTP) or files (folder) per label")

    add_source(
        commands.add_parser("ingest", parents=[common], help="download/copy labelled images into the object store")
    )
    features = commands.add_parser("features", parents=[common], help="build the next feature-set version")
    features.add_argument("--force", action="store_true", help="build a new version even if nothing changed")
    for name, help_text in (("train", "train, register and gate a model"), ("run", "ingest + features + train")):
        p = commands.add_parser(name, parents=[common], help=help_text)
        if name == "run":
            add_source(p)
        else:
            p.add_argument("--feature-set", type=int, help="feature-set version (default: latest)")
        p.add_argument("--epochs", type=int, help="override TRAINER_EPOCHS")
        p.add_argument("--seed", type=int, help="override TRAINER_SEED")
        p.add_argument("--force", action="store_true", help="promote even if the quality gate says no")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "aiobotocore", "httpx", "urllib3", "alembic", "mlflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = TrainerSettings()
    overrides = {
        k: v for k, v in (("epochs", getattr(args, "epochs", None)), ("seed", getattr(args, "seed", None))) if v
    }
    if overrides:
        settings = settings.model_copy(update=overrides)
    progress = not args.quiet
    try:
        if args.command in ("ingest", "run"):
            report = asyncio.run(ingest(settings, args.source, args.per_class, progress=progress))
            print(report.summary())
        if args.command in ("features", "run"):
            feature_set = asyncio.run(
                build_features(
                    settings, force=getattr(args, "force", False) and args.command == "features", progress=progress
                )
            )
            print(feature_set.summary())
        if args.command in ("train", "run"):
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
