"""``run --if-needed``: whether to train now, decided from evidence and explained in one line.

Train when no model holds the alias, when the images differ from those the champion was trained on, or when
recent predictions have drifted from its training data (PSI of :mod:`shared.drift`). Never train twice on the
same images: if a model was already trained on the current images after the champion (and the gate kept the
champion), the same data would give the same verdict, so the run waits for new images instead of registering
the same rejected model every few hours.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import select

from services.trainer.features import snapshot_of
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.drift import worst
from shared.tables import ImageRow


@dataclass(frozen=True, slots=True)
class Attempt:
    """A finished training run on the current images, newer than the champion's."""

    run_id: str
    version: str | None
    gate: str
    """``promoted`` or ``rejected``, and why."""


@dataclass(frozen=True, slots=True)
class Evidence:
    alias: str
    current_images: int
    current_snapshot: str
    champion_version: str | None = None
    champion_images: int | None = None
    champion_snapshot: str | None = None
    attempt: Attempt | None = None
    drift_samples: int = 0
    """Predictions in the window (at most ``TRAINER_DRIFT_WINDOW``)."""
    drift_feature: str | None = None
    """The alerting feature with the highest PSI; None when there were too few predictions to judge."""
    drift_psi: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    train: bool
    reason: str
    figures: dict[str, object]

    def summary(self) -> str:
        return f"if-needed: {'training' if self.train else 'skipping'}: {self.reason}"


def decide(evidence: Evidence, *, threshold: float, min_samples: int) -> Decision:
    """The rule, without I/O: first match wins (no champion, already tried, new images, drift, else skip)."""
    e = evidence
    figures: dict[str, object] = {
        "champion_version": e.champion_version,
        "current_images": e.current_images,
        "champion_images": e.champion_images,
        "new_images": (e.current_images - e.champion_images) if e.champion_images is not None else None,
        "drift_samples": e.drift_samples,
        "drift_feature": e.drift_feature,
        "drift_psi": e.drift_psi,
        "drift_threshold": threshold,
    }
    judged = e.drift_psi is not None and e.drift_samples >= min_samples
    drifted = judged and e.drift_psi > threshold
    drift = (
        f"{e.drift_feature} PSI {e.drift_psi:.3f} {'>' if drifted else '<='} {threshold:g} "
        f"over the last {e.drift_samples} predictions"
        if judged
        else f"drift not judged: {e.drift_samples} predictions, {min_samples} needed"
    )

    def decision(train: bool, reason: str) -> Decision:
        return Decision(train, reason, figures)

    if e.champion_version is None:
        return decision(True, f"no model holds the alias {e.alias!r} yet ({e.current_images} images ingested)")
    if e.attempt is not None:
        name = f"v{e.attempt.version}" if e.attempt.version else f"run {e.attempt.run_id[:8]}"
        return decision(
            False,
            f"{name} was already trained on the current {e.current_images} images after champion "
            f"v{e.champion_version} (gate: {e.attempt.gate}); the same images would give the same model, so "
            f"waiting for new ones ({drift}; run without --if-needed to train anyway)",
        )
    if e.current_snapshot != e.champion_snapshot:
        if e.champion_images is not None and e.current_images > e.champion_images:
            change = f"{e.current_images - e.champion_images} new images"
        else:
            change = "the images changed"
        then = f", {e.champion_images} then" if e.champion_images is not None else ""
        return decision(
            True,
            f"{change} since champion v{e.champion_version} was trained ({e.current_images} now{then}; {drift})",
        )
    if drifted:
        return decision(
            True,
            f"input drift: {drift} (champion v{e.champion_version}'s {e.current_images} images are unchanged)",
        )
    return decision(
        False,
        f"champion v{e.champion_version} is up to date: trained on the current {e.current_images} images; "
        + (f"no input drift ({drift})" if judged else drift),
    )


def gather(settings: TrainerSettings) -> Evidence:
    """Read the evidence: the images table, the registry (champion, later runs) and the predictions table."""
    from services.trainer.drift import load_champion, recent_predictions
    from services.trainer.registry import connect

    hashes = asyncio.run(_image_hashes(settings))
    registry = settings.registry
    base = Evidence(alias=registry.model_alias, current_images=len(hashes), current_snapshot=snapshot_of(hashes))
    client = connect(registry)
    champion = load_champion(settings, client)
    if champion is None:
        return base
    recent = asyncio.run(recent_predictions(settings, settings.drift_window))
    feature, psi = worst(champion.reference.psi(recent.rows)) if len(recent) else (None, None)
    return Evidence(
        alias=base.alias,
        current_images=base.current_images,
        current_snapshot=base.current_snapshot,
        champion_version=champion.version,
        champion_images=champion.image_count,
        champion_snapshot=champion.snapshot,
        attempt=_later_attempt(client, settings, champion, base.current_snapshot),
        drift_samples=len(recent),
        drift_feature=feature,
        drift_psi=psi,
    )


def check(settings: TrainerSettings) -> Decision:
    return decide(gather(settings), threshold=settings.drift_threshold, min_samples=settings.drift_min_samples)


async def _image_hashes(settings: TrainerSettings) -> list[str]:
    async with open_database(settings.database) as sessions, sessions() as session:
        return list((await session.scalars(select(ImageRow.sha256))).all())


def _later_attempt(client, settings: TrainerSettings, champion, snapshot: str) -> Attempt | None:
    """The newest finished, gated run on ``snapshot`` that started after the champion's and is not it."""
    experiments = {champion.experiment_id}
    configured = client.get_experiment_by_name(settings.registry.experiment)
    if configured is not None:
        experiments.add(configured.experiment_id)
    runs = client.search_runs(
        sorted(experiments),
        filter_string=f"params.feature_set_snapshot = '{snapshot}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == champion.run_id or run.info.start_time <= champion.start_time_ms:
            continue
        if "gate.promoted" not in tags:  # finished without reaching the gate: not a verdict on these images
            continue
        versions = client.search_model_versions(
            f"name = '{settings.registry.model_name}' and run_id = '{run.info.run_id}'"
        )
        outcome = "promoted" if tags["gate.promoted"] == "true" else "rejected"
        reason = tags.get("gate.reason", "")
        return Attempt(
            run.info.run_id, versions[0].version if versions else None, f"{outcome}: {reason}" if reason else outcome
        )
    return None
