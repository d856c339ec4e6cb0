"""``python -m services.trainer drift`` on real MariaDB + S3 + MLflow: the table, the PNG, and PSI as the API has it."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import timedelta
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from services.trainer.cli import main
from services.trainer.drift import RecentPredictions, drift_report, recent_predictions
from services.trainer.features import build_features
from services.trainer.ingest import ingest
from services.trainer.registry import connect
from services.trainer.settings import TrainerSettings
from services.trainer.train import train_and_register
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.drift import ALERTING_FEATURES, Reference
from shared.settings import DatabaseSettings, ObjectStoreSettings, RegistrySettings
from tests.conftest import AWS_ENV, MYSQL_HOST, MYSQL_PORT, settings_env
from tests.crafted import FAST_TRAINING, crafted, write_crafted_folder
from tests.trainer.test_feedback_ingest import START, api_prediction, record

DARK = 150


@pytest.fixture(scope="module")
def champion(databases, s3_endpoint: str, mlflow_server: str, tmp_path_factory) -> TrainerSettings:
    """A crafted data set, its feature set and a champion trained on it (only its data matters here)."""
    folder = write_crafted_folder(tmp_path_factory.mktemp("drift") / "photos", per_class=40)
    settings = TrainerSettings(
        store=ObjectStoreSettings(
            url=f"s3://bucket-{uuid.uuid4().hex[:12]}/data",
            endpoint_url=s3_endpoint,
            access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        ),
        database=DatabaseSettings(url=f"mysql+asyncmy://root@{MYSQL_HOST}:{MYSQL_PORT}/{databases.create()}"),
        registry=RegistrySettings(
            tracking_uri=mlflow_server,
            s3_endpoint_url=s3_endpoint,
            experiment=f"exp-{uuid.uuid4().hex[:8]}",
            model_name=f"dandelion-grass-{uuid.uuid4().hex[:8]}",
        ),
        data_source=str(folder),
        **{**FAST_TRAINING, "promotion_floor": 0.0},
    )
    asyncio.run(ingest(settings, progress=False))
    asyncio.run(build_features(settings, progress=False))
    result = train_and_register(settings, progress=False)
    assert result.decision.promote, result.decision.reason
    return settings


@pytest.fixture
def champion_env(champion: TrainerSettings, monkeypatch: pytest.MonkeyPatch) -> TrainerSettings:
    for key, value in settings_env(champion).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRAINER_DRIFT_MIN_SAMPLES", "100")
    return champion


def stored_reference(settings: TrainerSettings) -> Reference:
    """The reference the API loads with the model: from the champion's MLmodel metadata."""
    connect(settings.registry)
    uri = f"models:/{settings.registry.model_name}@{settings.registry.model_alias}"
    return Reference.from_dict(mlflow.models.get_model_info(uri).metadata["drift_reference"])


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_without_a_champion_it_fails_in_one_line(
    stack_settings: TrainerSettings, registry_settings: RegistrySettings, monkeypatch, capsys
) -> None:
    for key, value in settings_env(stack_settings.model_copy(update={"registry": registry_settings})).items():
        monkeypatch.setenv(key, value)
    assert main(["drift", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: no model holds the alias 'champion' of '{registry_settings.model_name}': nothing to compare with"
    ]


def test_without_predictions_it_fails_in_one_line(champion_env: TrainerSettings, capsys, tmp_path: Path) -> None:
    out = tmp_path / "drift.png"
    assert main(["drift", "--quiet", "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: no predictions of '{champion_env.registry.model_name}' are recorded yet")
    assert not out.exists()


def test_report_table_png_and_psi(champion_env: TrainerSettings, capsys, tmp_path: Path) -> None:
    settings = champion_env
    folder = Path(settings.data_source)
    normal = [p.read_bytes() for p in sorted(folder.glob("*/*.jpg"))[::2]]  # older: outside the window
    dark = [
        jpeg(ImageEnhance.Brightness(crafted(("dandelion", "grass")[i % 2], 80_000 + i)).enhance(0.35))
        for i in range(DARK)
    ]
    rows = []
    for i, data in enumerate([*normal, *dark]):
        row, _ = api_prediction(
            data, model_name=settings.registry.model_name, created_at=START + timedelta(seconds=i), stored=False
        )
        rows.append((row, None, None))
    # Two of the window's answers got feedback: a flagged one "neither", one in domain its own label.
    flagged, kept = rows[-1][0], rows[-2][0]
    flagged.in_domain, kept.in_domain = False, True
    # Another model's predictions, the newest of all, share the table and must not count.
    other, _ = api_prediction(normal[0], model_name="another-model", created_at=START + timedelta(days=1), stored=False)
    rows.append((other, None, None))
    asyncio.run(record(settings, rows, [(flagged.id, "neither"), (kept.id, kept.label), (other.id, "neither")]))

    out = tmp_path / "report" / "drift.png"
    assert main(["drift", "--quiet", "--window", str(DARK), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n" + "\n".join(lines))
    header, columns, *table, verdict, domain, told, written = lines
    assert header.startswith("drift: champion v1 (run ") and f"vs the last {DARK} predictions (" in header
    assert "reference from model metadata" in header
    assert columns.split() == ["feature", "ref", "mean", "ref", "std", "recent", "mean", "recent", "std", "PSI"]
    assert [line.split()[0] for line in table] == list(DESCRIPTOR_COLUMNS)
    assert written == f"drift: histograms written to {out}"
    assert domain.startswith("out of domain: 1 of 2 scored predictions")  # the others were recorded unscored
    assert told == (
        "feedback: 2 labels; 100.0% right of 1 dandelion/grass labels; 1 neither: 1 confirmed out of domain, "
        "0 answered as in domain (missed); 0 dandelion/grass photos wrongly flagged"
    )

    # PSI is shared.drift's, on the champion's stored reference, over exactly the window's rows.
    reference = stored_reference(settings)
    window = asyncio.run(recent_predictions(settings, DARK))
    assert len(window) == DARK
    expected = reference.psi(window.rows)
    printed = {line.split()[0]: float(line.split()[5]) for line in table}
    assert printed == {name: round(psi, 3) for name, psi in expected.items()}
    report = drift_report(settings, DARK)
    assert {f.name: f.psi for f in report.features} == expected

    # Darker photos: brightness features drift and are flagged; size features do not move.
    flagged = {line.split()[0] for line in table if line.endswith("DRIFT")}
    assert flagged == {name for name in ALERTING_FEATURES if expected[name] > 0.25}
    assert {"rgb_g_mean", "hsv_v_mean"} <= flagged
    assert expected["width"] < 0.25 and expected["height"] < 0.25
    worst = max(ALERTING_FEATURES, key=expected.__getitem__)
    assert verdict.startswith(f"worst colour feature: {worst} PSI {expected[worst]:.3f} > 0.25: INPUT DRIFT on ")

    # Reference and recent statistics are those of the training split and of the window.
    stats = {line.split()[0]: [float(v) for v in line.split()[1:5]] for line in table}
    brightness = DESCRIPTOR_COLUMNS.index("hsv_v_mean")
    assert stats["hsv_v_mean"][2] == pytest.approx(window.rows[:, brightness].mean(), rel=1e-3)
    assert stats["hsv_v_mean"][0] == pytest.approx(reference.features["hsv_v_mean"].mean, rel=1e-3)

    # A real PNG: the 4 x 4 grid at 80 dpi, with the drifted panels highlighted in red.
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1280, 1024)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    highlighted = np.all(np.abs(pixels - (0xFD, 0xEC, 0xEC)) <= 2, axis=1).sum()
    print(f"{len(flagged)} drifted panels, {highlighted} highlighted pixels, {out.stat().st_size} bytes")

    # A handful of predictions is shown but not called drift: PSI is mostly noise at that size.
    capsys.readouterr()  # what this test printed above
    assert main(["drift", "--quiet", "--window", "20", "--out", str(tmp_path / "few.png")]) == 0
    few = capsys.readouterr().out.strip().splitlines()
    assert not [line for line in few if line.endswith("DRIFT")]
    assert "not judged: 20 predictions, 100 needed" in few[-4]
    with Image.open(tmp_path / "few.png") as image:  # and the picture does not paint it red either
        few_pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert np.all(np.abs(few_pixels - (0xFD, 0xEC, 0xEC)) <= 2, axis=1).sum() == 0
    assert highlighted > 10_000 * len(flagged), highlighted
    assert 30_000 < out.stat().st_size < 1_000_000


def test_a_champion_without_a_stored_reference_gets_it_rebuilt(champion: TrainerSettings) -> None:
    """Champions trained before references were stored: rebuilt from their feature set, the same numbers."""
    client = connect(champion.registry)
    current = client.get_model_version_by_alias(champion.registry.model_name, "champion")
    params = client.get_run(current.run_id).data.params
    legacy = champion.model_copy(
        update={"registry": champion.registry.model_copy(update={"model_name": f"legacy-{uuid.uuid4().hex[:8]}"})}
    )

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, model_input: list[str]) -> list[str]:
            return ["grass" for _ in model_input]

    with mlflow.start_run(run_name="legacy"):
        mlflow.log_params(params)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Constant(),
            pip_requirements=["mlflow"],
            registered_model_name=legacy.registry.model_name,
        )
    client.set_registered_model_alias(legacy.registry.model_name, "champion", info.registered_model_version)
    uploads = [p.read_bytes() for p in sorted(Path(champion.data_source).glob("*/*.jpg"))[::4]]
    predictions = [
        (api_prediction(data, model_name=legacy.registry.model_name, created_at=START, stored=False)[0], None, None)
        for data in uploads
    ]
    asyncio.run(record(champion, predictions))

    report = drift_report(legacy, DARK)
    assert report.champion.reference_origin == f"rebuilt from feature set {params['feature_set_name']}:v1"
    reference = stored_reference(champion)
    assert report.champion.reference == reference
    assert len(report.recent) == len(uploads)
    assert {f.name: f.psi for f in report.features} == reference.psi(report.recent.rows)


def test_the_out_of_domain_share_counts_only_scored_predictions() -> None:
    rows = np.zeros((5, len(DESCRIPTOR_COLUMNS)))
    window = RecentPredictions(rows, None, None, np.array([1.0, 0.0, np.nan, 0.0, 1.0]))
    assert window.domain_line().startswith("out of domain: 2 of 4 scored predictions (50.0%) were unlike")
    unscored = RecentPredictions(rows, None, None, np.full(5, np.nan))
    assert "no prediction in the window was scored" in unscored.domain_line()


def test_the_feedback_line_counts_neither_as_evidence_about_the_flag_not_as_a_wrong_answer() -> None:
    rows = np.zeros((6, len(DESCRIPTOR_COLUMNS)))
    outside = np.array([1.0, 0.0, 1.0, 0.0, np.nan, 0.0])
    predicted = ("dandelion", "dandelion", "grass", "grass", "grass", "dandelion")
    told = ("neither", "neither", "grass", "dandelion", "grass", None)
    window = RecentPredictions(rows, None, None, outside, predicted, told)
    assert window.feedback_line() == (
        "feedback: 5 labels; 66.7% right of 3 dandelion/grass labels; 2 neither: 1 confirmed out of domain, "
        "1 answered as in domain (missed); 1 dandelion/grass photos wrongly flagged"
    )
    unlabelled = RecentPredictions(rows, None, None, outside, predicted, (None,) * 6)
    assert unlabelled.feedback_line() == "feedback: none on these predictions"
    only_neither = RecentPredictions(rows[:1], None, None, outside[:1], predicted[:1], ("neither",))
    assert "no dandelion/grass label; 1 neither: 1 confirmed out of domain" in only_neither.feedback_line()
