"""``python -m services.trainer drift``: the champion's training data against recent predictions, per descriptor.

Also the two loaders ``run --if-needed`` shares: the champion with its drift reference, and the latest rows
of the ``predictions`` table. PSI comes from :mod:`shared.drift` with the reference the champion carries in
its model metadata, so every number here is the one the API's drift gauge shows for the same inputs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import select

from services.trainer.indomain import FLAG_RATE
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import ALERTING_FEATURES, Reference, worst
from shared.feedback import DOMAIN_OUTCOMES, domain_outcome
from shared.labels import NEITHER
from shared.tables import FeedbackRow, PredictionRow

log = logging.getLogger(__name__)

REFERENCE_KEY = "drift_reference"
REFERENCE_ARTIFACT = "drift_reference.json"


class DriftError(RuntimeError):
    """There is nothing to compare: no champion, or no recorded prediction."""


@dataclass(frozen=True)
class ChampionModel:
    """The version behind the alias, its training run's parameters and its drift reference."""

    version: str
    run_id: str
    start_time_ms: int
    experiment_id: str
    params: dict[str, str]
    reference: Reference
    reference_origin: str
    """Where the reference came from: the model's metadata, the run's artifact, or rebuilt from the Parquet."""

    @property
    def feature_set_name(self) -> str | None:
        return self.params.get("feature_set_name")

    @property
    def feature_set_version(self) -> int | None:
        value = self.params.get("feature_set_version")
        return int(value) if value else None

    @property
    def snapshot(self) -> str | None:
        """sha256 over the hashes of the images the champion's feature set holds (``features.snapshot_of``)."""
        return self.params.get("feature_set_snapshot")

    @property
    def image_count(self) -> int | None:
        counts = [self.params.get(f"n_{split}") for split in ("train", "val", "test")]
        return sum(int(c) for c in counts) if all(counts) else None


def champion_reference(
    settings: TrainerSettings, version: str, run_id: str, params: dict[str, str], table: pa.Table | None = None
) -> tuple[Reference, str]:
    """The reference the API uses for ``version`` (its MLmodel metadata), else the run's artifact, else rebuilt.

    Rebuilding (champions trained before references were stored) reads the champion's feature set Parquet
    unless ``table`` already holds it; the bins are computed by the same function training uses.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = settings.registry.model_name
    try:
        metadata = mlflow.models.get_model_info(f"models:/{name}/{version}").metadata or {}
        if REFERENCE_KEY in metadata:
            return Reference.from_dict(metadata[REFERENCE_KEY]), "model metadata"
    except (MlflowException, OSError, ValueError) as exc:
        log.warning("no usable drift reference in %s v%s's metadata: %s", name, version, exc)
    try:
        return Reference.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/{REFERENCE_ARTIFACT}")), (
            f"run artifact {REFERENCE_ARTIFACT}"
        )
    except (MlflowException, OSError, ValueError) as exc:
        log.info("no usable %s in run %s (%s): rebuilding from the feature set", REFERENCE_ARTIFACT, run_id, exc)
    from services.trainer.train import drift_reference

    if table is None:
        table = load_champion_table(settings, params)
    source = f"{params.get('feature_set_name')}:v{params.get('feature_set_version')}"
    return drift_reference(table, source), f"rebuilt from feature set {source}"


def load_champion_table(settings: TrainerSettings, params: dict[str, str]) -> pa.Table:
    from services.trainer.features import FeatureSetError, load_feature_set

    if "feature_set_version" not in params:
        raise FeatureSetError("the champion's run does not name its feature set (no feature_set_version param)")
    named = settings.model_copy(update={"feature_set_name": params.get("feature_set_name", settings.feature_set_name)})
    _, table = asyncio.run(load_feature_set(named, int(params["feature_set_version"])))
    return table


def load_champion(settings: TrainerSettings, client=None) -> ChampionModel | None:
    """The champion and its reference, or None when no version holds the alias."""
    from services.trainer.registry import connect, current_champion

    client = client or connect(settings.registry)
    current = current_champion(client, settings.registry)
    return None if current is None else _champion_model(settings, client, *current)


def _champion_model(
    settings: TrainerSettings, client, version: str, run_id: str, table: pa.Table | None = None
) -> ChampionModel:
    run = client.get_run(run_id)
    params = dict(run.data.params)
    reference, origin = champion_reference(settings, version, run_id, params, table)
    return ChampionModel(version, run_id, run.info.start_time, run.info.experiment_id, params, reference, origin)


@dataclass(frozen=True)
class RecentPredictions:
    rows: np.ndarray
    """``(n, len(DESCRIPTOR_COLUMNS))``: the descriptors of the latest ``n`` predictions, newest first."""
    first: datetime | None
    last: datetime | None
    outside: np.ndarray | None = None
    """Per prediction: 1.0 out of domain, 0.0 in domain, NaN when the answering version had no in-domain score."""
    predicted: tuple[str, ...] = ()
    """Per prediction: the label it answered."""
    told: tuple[str | None, ...] = ()
    """Per prediction: the label a user gave it through ``POST /feedback`` (``neither`` too), None without one."""

    def __len__(self) -> int:
        return len(self.rows)

    def domain_line(self) -> str:
        """The share of the window's predictions that were "neither dandelion nor grass"."""
        scored = np.array([]) if self.outside is None else self.outside[~np.isnan(self.outside)]
        if not len(scored):
            return "out of domain: no prediction in the window was scored (versions without an in-domain score)"
        n = int(scored.sum())
        return (
            f"out of domain: {n} of {len(scored)} scored predictions ({n / len(scored):.1%}) were unlike the "
            f"training photos (about {FLAG_RATE:.1%} of real dandelion/grass photos are, by design)"
        )

    def feedback_line(self) -> str:
        """What users said about the window's answers: live accuracy over their dandelion/grass labels, and what
        every label (``neither`` too) says about the in-domain verdicts."""
        if all(told is None for told in self.told):
            return "feedback: none on these predictions"
        outside = self.outside if self.outside is not None else np.full(len(self.told), np.nan)
        labelled = [(p, t, o) for p, t, o in zip(self.predicted, self.told, outside, strict=True) if t is not None]
        judged = [(p, t) for p, t, _ in labelled if t != NEITHER]
        neither = len(labelled) - len(judged)
        accuracy = (
            f"{sum(p == t for p, t in judged) / len(judged):.1%} right of {len(judged)} dandelion/grass labels"
            if judged
            else "no dandelion/grass label"
        )
        outcomes = dict.fromkeys(DOMAIN_OUTCOMES, 0)
        for _, told, out in labelled:
            if (outcome := domain_outcome(None if np.isnan(out) else not out, told)) is not None:
                outcomes[outcome] += 1
        return (
            f"feedback: {len(labelled)} labels; {accuracy}; {neither} neither: "
            f"{outcomes['confirmed_out_of_domain']} confirmed out of domain, {outcomes['missed_out_of_domain']} "
            f"answered as in domain (missed); {outcomes['wrongly_flagged']} dandelion/grass photos wrongly flagged"
        )

    def span(self) -> str:
        if self.first is None or self.last is None:
            return "none"
        return f"{self.first:%Y-%m-%d %H:%M} to {self.last:%Y-%m-%d %H:%M} UTC"


async def recent_predictions(settings: TrainerSettings, window: int) -> RecentPredictions:
    """The descriptors of the latest ``window`` predictions of the configured model name (any version)."""
    columns = [getattr(PredictionRow, name) for name in DESCRIPTOR_COLUMNS]
    query = (
        select(PredictionRow.created_at, PredictionRow.in_domain, PredictionRow.label, FeedbackRow.label, *columns)
        .outerjoin(FeedbackRow, FeedbackRow.prediction_id == PredictionRow.id)
        .where(PredictionRow.model_name == settings.registry.model_name)
        .order_by(PredictionRow.created_at.desc(), PredictionRow.id.desc())
        .limit(window)
    )
    async with open_database(settings.database) as sessions, sessions() as session:
        result = (await session.execute(query)).all()
    rows = np.asarray([r[4:] for r in result], dtype=np.float64).reshape(-1, len(DESCRIPTOR_COLUMNS))
    outside = np.asarray([np.nan if r[1] is None else float(not r[1]) for r in result], dtype=np.float64)
    times = [_utc(r[0]) for r in result]
    predicted, told = tuple(r[2] for r in result), tuple(r[3] for r in result)
    return RecentPredictions(rows, min(times, default=None), max(times, default=None), outside, predicted, told)


def _utc(moment: datetime) -> datetime:
    # MySQL's DATETIME keeps no zone: the API writes UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    reference_mean: float
    reference_std: float
    recent_mean: float
    recent_std: float
    psi: float
    alerting: bool
    over: bool

    @property
    def drifted(self) -> bool:
        return self.alerting and self.over

    def flag(self) -> str:
        if self.drifted:
            return "DRIFT"
        return "over (not alerting)" if self.over else ""


@dataclass(frozen=True)
class DriftReport:
    champion: ChampionModel
    recent: RecentPredictions
    reference_values: dict[str, np.ndarray]
    features: list[FeatureDrift]
    threshold: float
    min_samples: int = 1
    """Fewer recent predictions than this: the PSI is shown but not called drift (its chance level is ~9/n)."""

    @property
    def judged(self) -> bool:
        return len(self.recent) >= self.min_samples

    @property
    def worst(self) -> tuple[str, float]:
        return worst({f.name: f.psi for f in self.features})

    @property
    def reference_size(self) -> int:
        return len(self.reference_values[DESCRIPTOR_COLUMNS[0]])

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.drifted] if self.judged else []

    def table(self) -> str:
        c = self.champion
        lines = [
            f"drift: {self.champion_label()} ({c.reference.source or 'training data'}, "
            f"{self.reference_size} images; reference from {c.reference_origin}) "
            f"vs the last {len(self.recent)} predictions ({self.recent.span()})",
            f"{'feature':<12} {'ref mean':>10} {'ref std':>10} {'recent mean':>12} {'recent std':>11} {'PSI':>8}",
        ]
        for f in self.features:
            lines.append(
                f"{f.name:<12} {f.reference_mean:>10.4g} {f.reference_std:>10.4g} {f.recent_mean:>12.4g} "
                f"{f.recent_std:>11.4g} {f.psi:>8.3f}  {f.flag() if self.judged else ''}".rstrip()
            )
        name, psi = self.worst
        if not self.judged:
            lines.append(
                f"worst colour feature: {name} PSI {psi:.3f}; not judged: {len(self.recent)} predictions, "
                f"{self.min_samples} needed (TRAINER_DRIFT_MIN_SAMPLES; by chance alone PSI is about "
                f"{9 / len(self.recent):.2g} at this size)"
            )
            lines.append(self.recent.domain_line())
            lines.append(self.recent.feedback_line())
            return "\n".join(lines)
        verdict = (
            f"INPUT DRIFT on {', '.join(self.drifted)}" if self.drifted else "no input drift on the colour features"
        )
        comparison = ">" if psi > self.threshold else "<="
        lines.append(f"worst colour feature: {name} PSI {psi:.3f} {comparison} {self.threshold:g}: {verdict}")
        lines.append(self.recent.domain_line())
        lines.append(self.recent.feedback_line())
        return "\n".join(lines)

    def champion_label(self) -> str:
        return f"champion v{self.champion.version} (run {self.champion.run_id[:8]})"

    def plot(self, out: Path) -> Path:
        """A grid of per-feature histograms, training split vs recent predictions; drifted ones in red."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        columns = 4
        rows = -(-len(self.features) // columns)
        figure = Figure(figsize=(4 * columns, 3 * rows + 0.8), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, feature, recent in zip(axes, self.features, self.recent.rows.T, strict=False):
            reference = self.reference_values[feature.name]
            edges = np.histogram_bin_edges(np.concatenate([reference, recent]), bins=30)
            ax.hist(reference, edges, density=True, alpha=0.55, color="tab:green", label="training split")
            ax.hist(recent, edges, density=True, alpha=0.55, color="tab:blue", label="recent predictions")
            drifted = feature.drifted and self.judged  # too few predictions: shown, not called drift
            colour = "crimson" if drifted else "darkorange" if feature.over and self.judged else "black"
            ax.set_title(f"{feature.name}  PSI {feature.psi:.3f}", color=colour, fontsize=10)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
            if drifted:
                ax.set_facecolor("#fdecec")
                for spine in ax.spines.values():
                    spine.set_edgecolor("crimson")
                    spine.set_linewidth(2)
        for ax in axes[len(self.features) :]:
            ax.set_visible(False)
        axes[0].legend(fontsize=7, loc="upper left")
        verdict = (
            f"red: PSI > {self.threshold:g} on a colour feature"
            if self.judged
            else f"not judged: {len(self.recent)} predictions, {self.min_samples} needed"
        )
        figure.suptitle(
            f"{self.champion_label()} training split ({self.reference_size} images) vs the last "
            f"{len(self.recent)} predictions ({self.recent.span()}); {verdict}",
            fontsize=11,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=80)
        return out


def training_values(table: pa.Table) -> dict[str, np.ndarray]:
    """Each descriptor over the training split: the data the reference was built from."""
    train = table.filter(pc.equal(table["split"], "train"))
    return {name: train[name].to_numpy().astype(np.float64) for name in DESCRIPTOR_COLUMNS}


def compare(
    reference: Reference, reference_values: dict[str, np.ndarray], recent: np.ndarray, threshold: float
) -> list[FeatureDrift]:
    scores = reference.psi(recent)
    return [
        FeatureDrift(
            name=name,
            reference_mean=float(reference_values[name].mean()),
            reference_std=float(reference_values[name].std()),
            recent_mean=float(recent[:, i].mean()),
            recent_std=float(recent[:, i].std()),
            psi=scores[name],
            alerting=name in ALERTING_FEATURES,
            over=scores[name] > threshold,
        )
        for i, name in enumerate(DESCRIPTOR_COLUMNS)
    ]


def drift_report(settings: TrainerSettings, window: int | None = None) -> DriftReport:
    """Compare the champion's training split with the latest ``window`` predictions (default: the setting)."""
    from services.trainer.registry import connect, current_champion

    window = window or settings.drift_window
    registry = settings.registry
    client = connect(registry)
    current = current_champion(client, registry)
    if current is None:
        raise DriftError(
            f"no model holds the alias {registry.model_alias!r} of {registry.model_name!r}: nothing to compare with"
        )
    recent = asyncio.run(recent_predictions(settings, window))
    if not len(recent):
        raise DriftError(
            f"no predictions of {registry.model_name!r} are recorded yet: the API writes them to the predictions table"
        )
    version, run_id = current
    table = load_champion_table(settings, dict(client.get_run(run_id).data.params))
    champion = _champion_model(settings, client, version, run_id, table)
    values = training_values(table)
    features = compare(champion.reference, values, recent.rows, settings.drift_threshold)
    return DriftReport(champion, recent, values, features, settings.drift_threshold, settings.drift_min_samples)
