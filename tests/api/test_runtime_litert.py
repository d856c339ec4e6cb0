"""The LiteRT runtime: the trainer's export reproduces Keras, and the API loads it from the registry without
TensorFlow, at any batch size; TensorFlow stays the fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.api.forward import LiteRtForward
from services.api.registry import MlflowSource
from services.trainer.export import LITERT_FILE, ExportError, litert_model
from shared.settings import RegistrySettings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keras_model():
    """The product's network (pretrained backbone, resize, normalisation, softmax head) at a small working
    side, with test-time mirroring on: every layer kind the trainer exports."""
    from services.trainer import backbone
    from services.trainer.head import LinearHead
    from services.trainer.model import feature_model, serving_model

    variant = backbone.VARIANTS["lite0"]
    features = feature_model(backbone.build(variant, backbone.load_weights(variant)), resolution=96)
    rng = np.random.default_rng(1)
    # Coefficients of a trained head's size (a random steep one would amplify float rounding past 1e-5).
    head = LinearHead(rng.standard_normal(backbone.FEATURES) * 0.01, 0.2, np.full(backbone.FEATURES, 0.3),
                      np.full(backbone.FEATURES, 0.5), 0.01)  # fmt: skip
    return serving_model(features, head, tta=True)


@pytest.fixture(scope="module")
def flatbuffer(keras_model) -> bytes:
    return litert_model(keras_model)


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 224, 224, 3), dtype=np.float32)


def keras_answer(keras_model, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras_model(x, training=False))


def test_litert_equals_keras_at_every_batch_size(keras_model, flatbuffer: bytes) -> None:
    forward = LiteRtForward(flatbuffer, threads=2)
    for i, n in enumerate((1, 3, 16, 1, 5, 5)):  # growing, shrinking and repeated sizes
        x = batch(n, i)
        got = forward(x)
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, keras_answer(keras_model, x), atol=1e-5, rtol=0)


def test_answers_do_not_alias_the_interpreters_buffers(flatbuffer: bytes) -> None:
    forward = LiteRtForward(flatbuffer, threads=1)
    first = forward(batch(2, 0))
    kept = first.copy()
    forward(batch(2, 1))
    np.testing.assert_array_equal(first, kept)


def test_export_refuses_a_conversion_outside_the_tolerance(keras_model) -> None:
    with pytest.raises(ExportError, match="differs from Keras"):
        litert_model(keras_model, tolerance=-1.0)


@pytest.fixture(scope="module")
def registry(keras_model, flatbuffer: bytes, tmp_path_factory) -> Iterator[RegistrySettings]:
    """A SQLite registry with two versions of the model: v1 with the LiteRT export, v2 without."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    settings = RegistrySettings(tracking_uri=f"sqlite:///{root}/mlflow.db", model_name="litert-test")
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    experiment = client.create_experiment("litert", artifact_location=(root / "artifacts").as_uri())
    # MLflow's URIs are process-wide, and other tests of the run (the trainer's) point them elsewhere.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    (root / LITERT_FILE).write_bytes(flatbuffer)
    for extra_files in ([str(root / LITERT_FILE)], None):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.tensorflow.log_model(
                keras_model,
                name="model",
                pip_requirements=[],
                extra_files=extra_files,
                metadata={"labels": ["dandelion", "grass"]},
                registered_model_name=settings.model_name,
            )
    client.set_registered_model_alias(settings.model_name, settings.model_alias, "1")
    yield settings
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
from services.api.registry import MlflowSource
from shared.settings import RegistrySettings
source = MlflowSource(RegistrySettings.model_validate_json(sys.argv[1]))
model = source.load(*source.resolve())
x = np.random.default_rng(7).random((3, 224, 224, 3), dtype=np.float32)
print(json.dumps({
    "runtime": model.runtime,
    "version": model.version,
    "labels": list(model.labels),
    "probabilities": model.forward(x).tolist(),
    "tensorflow_imported": sorted(m for m in ("tensorflow", "keras", "mlflow.tensorflow") if m in sys.modules),
}))
"""


def test_the_api_loads_the_litert_export_without_tensorflow(registry: RegistrySettings, keras_model) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, registry.model_dump_json()],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["runtime"] == "litert"
    assert loaded["tensorflow_imported"] == []
    assert loaded["version"] == "1" and loaded["labels"] == ["dandelion", "grass"]
    expected = keras_answer(keras_model, np.random.default_rng(7).random((3, 224, 224, 3), dtype=np.float32))
    np.testing.assert_allclose(loaded["probabilities"], expected, atol=1e-5, rtol=0)


def test_tensorflow_runs_a_version_without_the_export_and_on_request(registry: RegistrySettings, keras_model) -> None:
    x = batch(2, 9)
    expected = keras_answer(keras_model, x)
    for runtime, version in (("auto", "2"), ("tensorflow", "1")):
        model = MlflowSource(registry, runtime=runtime).load(version, "run")
        assert model.runtime == "tensorflow", runtime
        np.testing.assert_allclose(model.forward(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="no LiteRT export"):
        MlflowSource(registry, runtime="litert").load("2", "run")


def test_a_version_without_the_export_where_tensorflow_is_missing_says_what_to_do(
    registry: RegistrySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in the API image, which carries no TensorFlow: the version is refused with the way out, not an ImportError.
    import importlib.util

    find_spec = importlib.util.find_spec
    without_tensorflow = lambda name, *a: None if name == "tensorflow" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", without_tensorflow)
    with pytest.raises(RuntimeError, match=r"version 2 needs TensorFlow \(it has no LiteRT export .* not installed"):
        MlflowSource(registry, runtime="auto").load("2", "run")
    with pytest.raises(RuntimeError, match=r"version 1 needs TensorFlow \(API_RUNTIME is 'tensorflow'\)"):
        MlflowSource(registry, runtime="tensorflow").load("1", "run")
    assert MlflowSource(registry, runtime="auto").load("1", "run").runtime == "litert"
