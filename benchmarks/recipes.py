"""Recipe comparison by cross-validation: which backbone and working side the trainer should use.

Every recipe is judged by the trainer's own code path, on the same photos: ingest the sources once (embedded
defaults in a work folder), build the feature set, compute each recipe's embeddings (the embedding store keeps
them per backbone and side, so a rerun only computes what is new), then the run's whole evaluation
(:func:`services.trainer.train.fit`: the planned cross-validation of head, calibration and in-domain scores,
the cross-source estimates). Nothing is registered.

    python -m benchmarks.recipes                                  # both folders, the default recipes
    python -m benchmarks.recipes --recipes lite0@224 lite0@288 --source ../shared/data/dandelion-grass
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_SOURCES = (SHARED / "dandelion-grass", SHARED / "flowers")
DEFAULT_RECIPES = ("lite0@224", "lite0@256", "lite0@288", "lite0@320")


def row(recipe: str, fitted, seconds: float) -> str:
    est = fitted.estimates
    caught = " / ".join(f"{v:.1%}" for v in est.caught_by_kind.values()) or "n/a"
    return (
        f"| {recipe} | {est.mean:.2%} ± {est.sd:.2%} | "
        + " | ".join(f"{v:.1%}" for v in est.recall.values())
        + f" | {est.small_accuracy:.1%} | {est.ece_after:.3f} | {est.flagged:.1%} | {caught} | {est.ood_caught:.1%} "
        f"| {seconds:.0f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", type=Path, help="photo folders (default: both folders)")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="VARIANT@SIDE, e.g. lite0@288")
    parser.add_argument("--workdir", type=Path, help="keep the photos' store and embeddings here for reruns")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sources = [str(s) for s in (args.source or DEFAULT_SOURCES)]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recipes-"))
    work.mkdir(parents=True, exist_ok=True)

    from services.trainer.features import build_features
    from services.trainer.ingest import ingest
    from services.trainer.settings import TrainerSettings
    from services.trainer.train import fit, load, out_of_domain_features
    from shared.labels import LABELS
    from shared.quiet import import_tensorflow
    from shared.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings

    base = TrainerSettings(
        store=ObjectStoreSettings(url=str(work / "objects")),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{work}/dandelion.db"),
        registry=RegistrySettings(tracking_uri=f"sqlite:///{work}/mlflow.db"),
        ood_set=work / "ood-set",
        seed=args.seed,
    )
    print(asyncio.run(ingest(base, sources, progress=False)).line())
    print(asyncio.run(build_features(base, progress=False)).summary())
    import_tensorflow()
    print()
    print(
        "| recipe | accuracy (mean ± sd over folds) | "
        + " | ".join(LABELS)
        + " | at 128 px | ECE | real photos flagged | refused kinds caught | out-of-domain caught | evaluation |"
    )
    print("|---|---|" + "---|" * len(LABELS) + "---|---|---|---|---|---|")
    for recipe in args.recipes:
        variant, _, side = recipe.partition("@")
        settings = base.model_copy(update={"backbone": variant, "resolution": int(side)})
        _, data, _ = load(settings, None, progress=False)
        names, ood = out_of_domain_features(settings)
        started = time.perf_counter()
        fitted = fit(settings, data, names, ood, progress=False)
        print(row(recipe, fitted, time.perf_counter() - started), flush=True)
    print(f"\n{fitted.estimates.plan.describe()}; sources: {', '.join(sources)}; work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
