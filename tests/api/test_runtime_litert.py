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
from services.trainer.export import LITERT_FILE, ExportError, litert_model, outputs
from shared.settings import RegistrySettings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def network():
    """The product's network (pretrained backbone, resize, normalisation, a softmax head on three classes: the two
    served and one refused kind) at a small working side, with an in-domain bank: every layer kind and every
    column the trainer exports."""
    from services.trainer import backbone
    from services.trainer.head import SoftmaxHead
    from services.trainer.indomain import Bank, DomainModel, normalised
    from services.trainer.model import feature_map_model, feature_model, serving_model

    variant = backbone.VARIANTS["lite0"]
    features = feature_model(backbone.build(variant, backbone.load_weights(variant)), resolution=96)
    rng = np.random.default_rng(1)
    # Coefficients of a trained head's size (a random steep one would amplify float rounding past 1e-5).
    head = SoftmaxHead(("dandelion", "grass", "daisy"), rng.standard_normal((backbone.FEATURES, 3)) * 0.01,
                       np.array([0.2, -0.1, 0.0]), np.full(backbone.FEATURES, 0.3), np.full(backbone.FEATURES, 0.5),
                       0.01, calibration_scale=1.5)  # fmt: skip
    bank = Bank(normalised(rng.random((40, backbone.FEATURES), dtype=np.float32)), represented=40)
    domain = DomainModel(bank, 5, 0.3, 0.5, 0.025, 0.02, 40, ("daisy",))
    return serving_model(features, head), feature_map_model(features), head, domain


@pytest.fixture(scope="module")
def keras_model(network):
    return network[0]


@pytest.fixture(scope="module")
def flatbuffer(network) -> bytes:
    return litert_model(*network)


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 224, 224, 3), dtype=np.float32)


def keras_answer(keras_model, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras_model(x, training=False))


def test_litert_equals_keras_at_every_batch_size(keras_model, flatbuffer: bytes) -> None:
    forward = LiteRtForward(flatbuffer, threads=2)
    for i, n in enumerate((1, 3, 16, 1, 5, 5)):  # growing, shrinking and repeated sizes
        x = batch(n, i)
        got = forward(x)
        assert got.shape == (n, outputs(3)["columns"])  # 96 px: a 3 x 3 feature map
        np.testing.assert_allclose(got[:, :2], keras_answer(keras_model, x), atol=1e-5, rtol=0)


def test_answers_do_not_alias_the_interpreters_buffers(flatbuffer: bytes) -> None:
    forward = LiteRtForward(flatbuffer, threads=1)
    first = forward(batch(2, 0))
    kept = first.copy()
    forward(batch(2, 1))
    np.testing.assert_array_equal(first, kept)


def test_export_refuses_a_conversion_outside_the_tolerance(network) -> None:
    with pytest.raises(ExportError, match="differs from Keras"):
        litert_model(*network, tolerance=-1.0)


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
                metadata=METADATA,
                registered_model_name=settings.model_name,
            )
    client.set_registered_model_alias(settings.model_name, settings.model_alias, "1")
    yield settings
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


METADATA = {
    "labels": ["dandelion", "grass"],
    "outputs": outputs(3),
    "in_domain": {"threshold": 0.3, "neither_threshold": 0.5, "refused_kinds": ["daisy"], "score_column": 2,
                  "neither_column": 3},
}  # fmt: skip
"""What the trainer writes for its export (services.trainer.train), for this network."""


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
    "answers": model.forward(x).tolist(),
    "domain_threshold": model.domain_threshold,
    "neither_threshold": model.neither_threshold,
    "refused_kinds": list(model.refused_kinds),
    "grid": model.outputs.grid,
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
    answers = np.asarray(loaded["answers"])
    assert answers.shape == (3, outputs(3)["columns"])
    np.testing.assert_allclose(answers[:, :2], expected, atol=1e-5, rtol=0)
    assert (loaded["domain_threshold"], loaded["neither_threshold"], loaded["refused_kinds"]) == (0.3, 0.5, ["daisy"])
    assert loaded["grid"] == 3


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
