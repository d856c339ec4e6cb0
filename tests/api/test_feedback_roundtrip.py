"""Feedback round trip on the real stack (MariaDB, moto S3, the MLflow server): photos classified by the API
with uploads kept, users' feedback, then the continuous-training command ingests them and trains on them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from contextlib import redirect_stdout

import httpx
from asgi_lifespan import LifespanManager
from mlflow import MlflowClient
from sqlalchemy import select

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.trainer.cli import main
from services.trainer.features import load_feature_set
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.tables import ImageRow, PredictionRow
from tests.api.conftest import wait_ready
from tests.conftest import AWS_ENV, MYSQL_HOST, MYSQL_PORT
from tests.crafted import FAST_TRAINING, crafted_jpeg, write_crafted_folder


def cli(*args: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([*args, "--quiet"])
    ours = ("ingest", "if-needed:", "features:", "train:", "gate:", "done:")
    return code, [line for line in out.getvalue().splitlines() if line.startswith(ours)]


async def classify_and_correct(photos: list[tuple[bytes, str]]) -> list[str]:
    """Each photo through POST /predict, then its true label through POST /feedback; the prediction ids."""
    settings = ApiSettings(
        prediction_log=True, store_uploads=True, prediction_log_flush_interval_s=0.05, poll_interval_s=3600
    )
    app = create_app(settings)  # the real registry source: the champion the trainer just promoted
    ids = []
    async with (
        LifespanManager(app, startup_timeout=120) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://api") as client,
    ):
        await wait_ready(client, timeout=120)
        for i, (data, truth) in enumerate(photos):
            answer = await client.post("/predict", files={"file": (f"phone-{i}.jpg", data, "image/jpeg")})
            assert answer.status_code == 200, answer.text
            prediction_id = answer.json()["id"]
            feedback = await client.post("/feedback", json={"prediction_id": prediction_id, "label": truth})
            assert feedback.status_code == 201, feedback.text
            ids.append(prediction_id)
    return ids


async def rows(settings: TrainerSettings, ids: list[str]) -> tuple[list[PredictionRow], list[ImageRow]]:
    async with open_database(settings.database) as sessions, sessions() as session:
        predictions = (await session.scalars(select(PredictionRow).where(PredictionRow.id.in_(ids)))).all()
        images = (await session.scalars(select(ImageRow).where(ImageRow.source.like("feedback:%")))).all()
    return list(predictions), list(images)


def test_feedback_reaches_the_next_training_run(
    databases, s3_endpoint: str, mlflow_server: str, tmp_path, monkeypatch
) -> None:
    folder = write_crafted_folder(tmp_path / "photos", per_class=30)
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
        **{f"TRAINER_{key.upper()}": str(value) for key, value in FAST_TRAINING.items()},
        "TRAINER_PROMOTION_FLOOR": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = TrainerSettings()

    code, output = cli("run")  # champion v1, trained on the 60 crafted photos
    assert code == 0 and any(line.startswith("gate: v1 is now the champion") for line in output), output

    # Production: new photos (not in the data set), classified, and each one's true label told by a user.
    photos = [(crafted_jpeg(label, 90_000 + i), label) for i in range(4) for label in ("dandelion", "grass")]
    ids = asyncio.run(classify_and_correct(photos))
    predictions, _ = asyncio.run(rows(settings, ids))
    assert len(predictions) == len(photos) and all(p.image_key for p in predictions)  # logged, upload kept

    # The scheduled command: ingest the source and the feedback, decide, train.
    code, output = cli("run", "--if-needed", "--from-feedback")
    print("\n" + "\n".join(output))
    assert code == 0, output
    assert any(line.startswith("ingest (feedback): 8 new") for line in output), output
    decision = next(line for line in output if line.startswith("if-needed:"))
    assert decision.startswith("if-needed: training: 8 new images"), decision
    done = next(line for line in output if line.startswith("done:"))
    assert f"{settings.registry.model_name} v2" in done and "feature set v2" in done

    _, images = asyncio.run(rows(settings, ids))
    by_hash = {hashlib.sha256(data).hexdigest(): label for data, label in photos}
    assert {i.sha256: i.label for i in images} == by_hash  # the feedback's labels, one row per photo
    assert {i.source for i in images} == {f"feedback:{prediction_id}" for prediction_id in ids}

    feature_set, table = asyncio.run(load_feature_set(settings, 2))
    columns = table.select(["sha256", "label", "split"]).to_pydict()
    in_v2 = {sha: (label, split) for sha, label, split in zip(*columns.values(), strict=True)}
    # In the next run's feature set, under the users' labels, and trained on only: the test split the gate
    # judges by stays curated data.
    assert {sha: in_v2.get(sha) for sha in by_hash} == {sha: (label, "train") for sha, label in by_hash.items()}
    assert feature_set.row_count == 60 + len(photos)
    client = MlflowClient(settings.registry.tracking_uri)
    run = client.get_run(client.get_model_version(settings.registry.model_name, "2").run_id)
    assert run.data.params["feature_set_version"] == "2"
