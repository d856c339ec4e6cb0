"""``python -m services.api.payload``: the MLflow request for a photo goes to standard output, never to a file in
the repository (the README's old recipe left ``seed_payload.json`` at its root)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from shared.images import preprocess
from tests.crafted import crafted_jpeg

REPO = Path(__file__).resolve().parents[2]


async def test_the_payload_goes_to_stdout_and_invocations_answer_it_as_predict_does(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    photo = tmp_path / "grass.jpg"
    photo.write_bytes(crafted_jpeg("grass", 7))
    before = set(REPO.iterdir())
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.api.payload", str(photo)], cwd=REPO, capture_output=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    assert set(REPO.iterdir()) == before, "nothing is written to the repository"
    body = orjson.loads(run.stdout)
    inputs = np.asarray(body["inputs"], np.float32)
    assert inputs.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(inputs[0], preprocess(photo.read_bytes()), atol=5e-5)  # rounded to 4 decimals

    scored = await client.post("/invocations", content=run.stdout, headers={"content-type": "application/json"})
    predicted = await client.post("/predict", files={"file": ("grass.jpg", photo.read_bytes(), "image/jpeg")})
    assert scored.status_code == 200 and predicted.status_code == 200
    (probabilities,) = scored.json()["predictions"]
    assert probabilities[1] == pytest.approx(predicted.json()["probabilities"]["grass"], abs=1e-3)


def test_a_file_that_is_not_a_photo_is_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    run = subprocess.run(
        [sys.executable, "-m", "services.api.payload", str(notes), str(tmp_path / "missing.png")],
        cwd=REPO, capture_output=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and run.stdout == b""
    assert run.stderr.decode().startswith("error: ") and run.stderr.decode().count("\n") == 1
