"""Recipe comparison by cross-validation on the labelled photos: which backbone, working side and test-time
mirroring the trainer should use. Prints the README's table (mean ± sd of fold accuracies, per class).

Every recipe is the trainer's own code path (:mod:`services.trainer.model`, :mod:`services.trainer.head`,
:mod:`services.trainer.crossval`): features of each photo and its mirror image through the frozen backbone,
then nested k-fold cross-validation of "choose the head's regularisation, fit it", repeated over several
fold shuffles. Nothing here touches a database, an object store or MLflow.

    python -m benchmarks.recipes                                  # the README's table (~15 min on 2 cores)
    python -m benchmarks.recipes --recipes lite0@288 lite0@288+tta --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DANDELION_DATA_DIR", REPO.parent / "shared" / "data" / "dandelion-grass"))
DEFAULT_RECIPES = (
    "lite0@224", "lite0@224+tta", "lite0@256", "lite0@288", "lite0@288+tta", "lite0@320", "lite0@320+tta",
    "lite1@240", "lite1@288", "lite2@260", "lite2@288",
)  # fmt: skip


def load_photos(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every photo of ``folder/{label}/`` through the shared preprocessing, labels in the product's order."""
    from shared.images import preprocess
    from shared.labels import LABELS

    paths = [(p, i) for i, label in enumerate(LABELS) for p in sorted((folder / label).iterdir()) if p.is_file()]
    x = np.stack([preprocess(p.read_bytes()) for p, _ in paths])
    return x, np.array([i for _, i in paths]), [str(p) for p, _ in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with a subfolder per label")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="VARIANT@SIDE[+tta]")
    parser.add_argument("--repeats", type=int, default=3, help="fold shuffles (seeds 0..N-1)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from services.trainer import backbone, crossval
    from services.trainer.model import extractor, feature_model
    from shared.labels import LABELS

    x, y, _ = load_photos(args.data)
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    print(f"{len(y)} photos from {args.data}; {args.folds}-fold nested cross-validation x {args.repeats} shuffles\n")
    print(f"| recipe | accuracy (mean ± sd over {args.folds * args.repeats} folds) | "
          + " | ".join(LABELS) + " | features ms/photo |")  # fmt: skip
    print("|---|---|" + "---|" * len(LABELS) + "---|")
    cache: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    for recipe in args.recipes:
        name, _, tta = recipe.partition("+")
        variant_name, _, side = name.partition("@")
        variant = backbone.VARIANTS[variant_name]
        key = (variant_name, int(side or variant.resolution))
        if key not in cache:
            extract = extractor(feature_model(backbone.build(variant, backbone.load_weights(variant)), key[1]))
            extract(x[:32])  # traced and warm before the clock starts
            started = time.perf_counter()
            views = np.stack([extract(x), extract(mirrored)], axis=1)
            cache[key] = views, (time.perf_counter() - started) / (2 * len(y)) * 1000
        views, ms = cache[key]
        result = crossval.cross_validate(
            views, y, folds=args.folds, seed=0, eval_views=2 if tta == "tta" else 1, repeats=args.repeats
        )
        print(
            f"| {recipe} | {result.mean:.2%} ± {result.sd:.2%} | "
            + " | ".join(f"{result.recall[label]:.1%}" for label in LABELS)
            + f" | {ms:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
