"""``run --if-needed`` on real MariaDB + S3 + MLflow: it trains when it should, skips when it should, says why.

One crafted data set and one trained champion for the module (the CLI's first run, with no champion, trains
it); the tests then add predictions and images to that state in file order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image, ImageEnhance
from sqlalchemy import func, select

from services.trainer.cli import main
from services.trainer.drift import load_champion
from services.trainer.registry import connect
from services.trainer.schedule import Attempt, Evidence, check, decide
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.descriptors import prepare
from shared.drift import ALERTING_FEATURES, as_rows, worst
from shared.tables import FeatureSetRow
from tests.conftest import AWS_ENV, MYSQL_HOST, MYSQL_PORT
from tests.crafted import FAST_TRAINING, crafted, write_crafted_folder
from tests.trainer.test_feedback_ingest import START, api_prediction, record

WINDOW = 120


@dataclass
class Stack:
    settings: TrainerSettings
    folder: Path
    first_code: int
    first_output: list[str]


OUR_LINES = ("ingest", "if-needed:", "features:", "train:", "gate:", "done:", "  run ", "  reports ", "  browse ")


def run_cli(*args: str) -> tuple[int, list[str]]:
    """Exit code and the command's own lines (Keras and MLflow print progress to stdout too)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", "--if-needed", "--quiet", *args])
    return code, [line for line in out.getvalue().splitlines() if line.startswith(OUR_LINES)]


@pytest.fixture(scope="module")
def stack(databases, s3_endpoint: str, mlflow_server: str, tmp_path_factory) -> Iterator[Stack]:
    """A fresh database, bucket and model name; the first ``run --if-needed`` (no champion) trains one."""
    folder = write_crafted_folder(tmp_path_factory.mktemp("if-needed") / "photos", per_class=40)
    env = {
        **AWS_ENV,
        "DATABASE_URL": f"mysql+asyncmy://root@{MYSQL_HOST}:{MYSQL_PORT}/{databases.create()}",
        "OBJECT_STORE_URL": f"s3://bucket-{uuid.uuid4().hex[:12]}/data",
        "S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_EXPERIMENT_NAME": f"exp-{uuid.uuid4().hex[:8]}",
        "MODEL_NAME": f"dandelion-grass-{uuid.uuid4().hex[:8]}",
        "DATA_SOURCE": str(folder),
        "TRAINER_DRIFT_WINDOW": str(WINDOW),
        "TRAINER_DRIFT_MIN_SAMPLES": "100",
        **{f"TRAINER_{key.upper()}": str(value) for key, value in FAST_TRAINING.items()},
        # What is decided here does not depend on how good the models are: any model is promoted.
        "TRAINER_PROMOTION_FLOOR": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        code, output = run_cli()
        yield Stack(TrainerSettings(), folder, code, output)


def counts(settings: TrainerSettings) -> tuple[int, int]:
    """(training runs in the experiment, feature-set versions)."""
    client = MlflowClient(settings.registry.tracking_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    runs = len(client.search_runs([experiment.experiment_id])) if experiment else 0

    async def feature_sets() -> int:
        async with open_database(settings.database) as sessions, sessions() as session:
            return await session.scalar(select(func.count()).select_from(FeatureSetRow)) or 0

    return runs, asyncio.run(feature_sets())


def mlflow_run_id(settings: TrainerSettings, version: str) -> str:
    client = MlflowClient(settings.registry.tracking_uri)
    return client.get_model_version(settings.registry.model_name, version).run_id


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def record_predictions(uploads: list[bytes], settings: TrainerSettings, minutes: int) -> None:
    """One API prediction per uploaded file, ``minutes`` after START (one second apart)."""
    rows = []
    for i, data in enumerate(uploads):
        row, _ = api_prediction(
            data,
            model_name=settings.registry.model_name,
            created_at=START + timedelta(minutes=minutes, seconds=i),
            stored=False,
        )
        rows.append((row, None, None))
    asyncio.run(record(settings, rows))


def test_without_a_champion_it_trains(stack: Stack) -> None:
    assert stack.first_code == 0, stack.first_output
    print("\n" + "\n".join(stack.first_output))
    ingest_line, decision, features, gate, done, run, reports, browse = stack.first_output
    assert ingest_line.startswith("ingest: 80 new")
    assert decision == "if-needed: training: no model holds the alias 'champion' yet (80 images ingested)"
    assert features.startswith("features: built") and " v1 " in features
    assert gate.startswith("gate: v1 is now the champion: ")
    assert done.startswith(f"done: {stack.settings.registry.model_name} v1 from feature set v1 in ")
    assert "test accuracy" in done and "cross-validated" in done
    assert run.split() == ["run", mlflow_run_id(stack.settings, "1")]
    assert reports.startswith("  reports  ") and reports.split()[1].endswith("/artifacts/report/")
    assert browse.startswith(f"  browse   {stack.settings.registry.tracking_uri}")


def test_nothing_new_skips_without_building_or_training(stack: Stack) -> None:
    before = counts(stack.settings)
    code, output = run_cli("--from-feedback")  # the continuous-training CronJob's command
    print("\n" + "\n".join(output))
    assert code == 0
    assert output == [
        output[0],
        output[1],
        "if-needed: skipping: champion v1 is up to date: trained on the current 80 images; "
        "drift not judged: 0 predictions, 100 needed",
    ]
    assert output[0].startswith("ingest: 0 new, 80 already stored")
    assert output[1].startswith("ingest (feedback): 0 new, 0 already stored") and output[1].endswith("0 feedback rows")
    assert counts(stack.settings) == before == (1, 1)


def test_predictions_like_the_training_data_skip(stack: Stack) -> None:
    # Users send photos like those the champion learnt from: the ingested files, both classes in turn.
    # (Fresh crafted photos would do in production, but against a 56-image training split PSI's chance level,
    # about 9 * (1/56 + 1/120) = 0.24, is the threshold itself.)
    dandelions, grasses = (sorted((stack.folder / label).glob("*.jpg")) for label in ("dandelion", "grass"))
    photos = [photo for pair in zip(dandelions, grasses, strict=True) for photo in pair]
    record_predictions([photos[i % len(photos)].read_bytes() for i in range(WINDOW)], stack.settings, minutes=0)
    decision = check(stack.settings)
    print(f"\n{decision.summary()}")
    assert not decision.train
    assert decision.figures["drift_samples"] == WINDOW
    assert decision.figures["drift_psi"] <= stack.settings.drift_threshold
    assert decision.reason.startswith("champion v1 is up to date: trained on the current 80 images; no input drift (")


def test_drifted_predictions_train(stack: Stack) -> None:
    # Photos taken at dusk: the same scenes, much darker. Newer than the normal ones, so they fill the window.
    dark = [
        jpeg(ImageEnhance.Brightness(crafted(("dandelion", "grass")[i % 2], 70_000 + i)).enhance(0.35))
        for i in range(WINDOW)
    ]
    record_predictions(dark, stack.settings, minutes=60)
    before = counts(stack.settings)
    decision = check(stack.settings)
    print(f"\n{decision.summary()}")
    assert decision.train
    assert decision.reason.startswith("input drift: ")
    assert decision.reason.endswith("(champion v1's 80 images are unchanged)")
    assert decision.figures["drift_feature"] in ALERTING_FEATURES
    assert decision.figures["drift_psi"] > stack.settings.drift_threshold

    # The PSI is shared.drift's, on the champion's stored reference, over exactly the window's rows.
    champion = load_champion(stack.settings, connect(stack.settings.registry))
    assert champion is not None and champion.reference_origin == "model metadata"
    rows = as_rows(prepare(data).descriptors for data in dark)
    feature, psi = worst(champion.reference.psi(rows))
    assert (feature, psi) == (decision.figures["drift_feature"], pytest.approx(decision.figures["drift_psi"]))
    assert counts(stack.settings) == before, "deciding builds and trains nothing"


def test_new_images_train_then_a_rejected_model_is_not_retrained(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # A floor no model reaches: the new version is registered but rejected, and champion v1 stays.
    monkeypatch.setenv("TRAINER_PROMOTION_FLOOR", "1.01")
    write_crafted_folder(stack.folder / "more", per_class=6, offset=5_000)
    code, output = run_cli("--source", str(stack.folder / "more"))
    print("\n" + "\n".join(output))
    assert code == 0, output
    assert output[0].startswith("ingest: 12 new")
    # The window still holds the dark predictions: the line reports them too.
    assert output[1] == (
        f"if-needed: training: 12 new images since champion v1 was trained (92 now, 80 then; {output[1].split('; ')[1]}"
    )
    assert "> 0.25 over the last 120 predictions)" in output[1]
    assert output[2].startswith("features: built") and " v2 " in output[2]
    gate = next(line for line in output if line.startswith("gate: "))
    assert gate.startswith("gate: v2 NOT promoted, the champion stays: test accuracy"), output
    assert "below the floor 1.0100" in gate
    assert counts(stack.settings) == (2, 2)

    # The same images (and the same drift) would give the same model: the next check waits for new images.
    code, output = run_cli()
    print("\n".join(output))
    assert code == 0
    assert len(output) == 2, output
    assert output[1].startswith(
        "if-needed: skipping: v2 was already trained on the current 92 images after champion v1 "
        "(gate: rejected: test accuracy"
    ), output[1]
    assert output[1].endswith("; run without --if-needed to train anyway)")
    assert counts(stack.settings) == (2, 2)


EVIDENCE = Evidence(
    alias="champion",
    current_images=100,
    current_snapshot="b" * 64,
    champion_version="4",
    champion_images=100,
    champion_snapshot="b" * 64,
    drift_samples=500,
    drift_feature="hsv_v_mean",
    drift_psi=0.04,
)


@pytest.mark.parametrize(
    ("changes", "train", "reason"),
    [
        (
            {"champion_version": None, "champion_images": None, "champion_snapshot": None, "drift_samples": 0},
            True,
            "no model holds the alias 'champion' yet (100 images ingested)",
        ),
        (
            {"current_images": 112, "current_snapshot": "c" * 64},
            True,
            "12 new images since champion v4 was trained (112 now, 100 then; "
            "hsv_v_mean PSI 0.040 <= 0.25 over the last 500 predictions)",
        ),
        (
            {"current_images": 99, "current_snapshot": "c" * 64, "drift_samples": 3},
            True,
            "the images changed since champion v4 was trained (99 now, 100 then; "
            "drift not judged: 3 predictions, 100 needed)",
        ),
        (
            {"drift_psi": 0.31},
            True,
            "input drift: hsv_v_mean PSI 0.310 > 0.25 over the last 500 predictions "
            "(champion v4's 100 images are unchanged)",
        ),
        (
            {"drift_psi": 0.31, "drift_samples": 99},
            False,
            "champion v4 is up to date: trained on the current 100 images; "
            "drift not judged: 99 predictions, 100 needed",
        ),
        (
            {},
            False,
            "champion v4 is up to date: trained on the current 100 images; "
            "no input drift (hsv_v_mean PSI 0.040 <= 0.25 over the last 500 predictions)",
        ),
        (
            {"drift_psi": 0.9, "attempt": Attempt("0123456789abcdef", "5", "rejected: does not beat champion v4")},
            False,
            "v5 was already trained on the current 100 images after champion v4 (gate: rejected: does not beat "
            "champion v4); the same images would give the same model, so waiting for new ones (hsv_v_mean PSI "
            "0.900 > 0.25 over the last 500 predictions; run without --if-needed to train anyway)",
        ),
    ],
    ids=["no-champion", "new-images", "images-changed", "drift", "too-few-predictions", "nothing", "already-tried"],
)
def test_decide(changes: dict[str, object], train: bool, reason: str) -> None:
    evidence = dataclasses.replace(EVIDENCE, **changes)
    decision = decide(evidence, threshold=0.25, min_samples=100)
    assert (decision.train, decision.reason) == (train, reason)
    assert decision.summary() == f"if-needed: {'training' if train else 'skipping'}: {reason}"
    assert decision.figures["drift_psi"] == evidence.drift_psi
    if evidence.champion_images is not None:
        assert decision.figures["new_images"] == evidence.current_images - evidence.champion_images
