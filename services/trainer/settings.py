"""The trainer's one settings object, built from the shared parts plus its own ``TRAINER_*`` knobs."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.drift import PSI_THRESHOLD
from shared.settings import (
    DEFAULT_DATA_SOURCE,
    DatabaseSettings,
    ObjectStoreSettings,
    RegistrySettings,
)


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRAINER_", env_file=".env", extra="ignore", populate_by_name=True, frozen=True
    )

    store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    data_source: str = Field(DEFAULT_DATA_SOURCE, validation_alias="DATA_SOURCE")
    """HTTP(S) base laid out as ``{base}/{label}/{i:08d}.jpg``, or a local folder with a subfolder per label."""
    per_class: int = 200
    """How many indices per label to try on an HTTP source (and the most files per label from a folder)."""
    download_concurrency: int = 16
    download_attempts: int = 4
    download_timeout_s: float = 20.0

    feature_set_name: str = "dandelion-grass"
    split_val_percent: int = 15
    split_test_percent: int = 15

    seed: int = 42
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 2e-3
    image_size: int = 128
    """Side of the square the network works at inside (a resize layer maps the 224 x 224 contract to it)."""
    patience: int = 10
    tta: bool = True
    """Average the prediction over the image and its mirror image (inside the exported model)."""
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
