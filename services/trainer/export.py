"""The serving model as a LiteRT flatbuffer: what the API runs without TensorFlow in its process.

TensorFlow alone costs the serving process about 700 MB and seconds of start-up; the LiteRT interpreter
(``ai-edge-litert``) runs the same graph in a few tens of MB. The conversion is float32 with no
quantization, and :func:`litert_model` checks it against Keras before returning, so a model whose LiteRT
twin would answer differently is never registered.
"""

from __future__ import annotations

import numpy as np

from services.trainer.indomain import DomainModel
from shared.images import MODEL_SIZE

LITERT_FILE = "model.tflite"
"""Name of the file inside the logged model (MLflow keeps ``extra_files`` under ``extra_files/``)."""
TOLERANCE = 1e-5
"""Largest difference in any probability between Keras and LiteRT that the export accepts."""


DOMAIN_COLUMN = "in_domain_distance"
"""Name of the LiteRT output's last column when the model carries an in-domain score."""


class ExportError(RuntimeError):
    """The LiteRT model does not reproduce the Keras model."""


def litert_model(
    keras_model,
    probe: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    *,
    with_features=None,
    domain: DomainModel | None = None,
) -> bytes:
    """``keras_model`` (float32 ``(-1, 224, 224, 3)`` -> probabilities) as LiteRT flatbuffer bytes.

    With ``domain`` (and ``with_features``, ``keras_model``'s graph with the pooled features as a second
    output, :func:`services.trainer.model.serving_models`), the output gains one last column: the in-domain
    distance (:mod:`services.trainer.indomain`), computed in the same pass from the same features. Only
    built-in LiteRT operators are allowed (the pip interpreter has no TensorFlow ops), and the result must
    agree with Keras (and NumPy for the distance) within ``tolerance`` on ``probe`` (default: a fixed
    random batch).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    if domain is not None:
        bank = tf.constant(domain.bank.T, tf.float32)  # (features, views): one matrix product per image

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32, name="image")])
    def serve(x):
        if domain is None:
            return keras_model(x, training=False)
        probabilities, pooled = with_features(x, training=False)  # one pass of the backbone for both
        unit = pooled / tf.maximum(tf.norm(pooled, axis=1, keepdims=True), 1e-12)
        nearest = tf.math.top_k(tf.matmul(unit, bank), k=min(domain.k, len(domain.bank))).values
        distance = 1.0 - nearest[:, -1:]
        return tf.concat([probabilities, distance], axis=1)

    # Weights frozen into constants here: left to the converter, some Keras models (a plain Conv2D + Dense one
    # was enough) came out with their weights as uninitialised resource variables, answering garbage.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], keras_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []  # float32 throughout: the answers must equal the Keras model's
    flatbuffer = converter.convert()

    if probe is None:
        probe = np.random.default_rng(0).random((3, MODEL_SIZE, MODEL_SIZE, 3), dtype=np.float32)
    expected = np.asarray(keras_model(tf.constant(probe, tf.float32), training=False))
    if domain is not None:
        _, pooled = with_features(tf.constant(probe, tf.float32), training=False)
        expected = np.concatenate([expected, domain.distances(np.asarray(pooled))[:, None]], axis=1)
    got = run_litert(flatbuffer, probe)
    difference = float(np.abs(got - expected).max())
    if not difference <= tolerance:
        raise ExportError(f"LiteRT differs from Keras by {difference:.3g} (tolerance {tolerance:g})")
    return flatbuffer


def run_litert(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    """One forward pass of a LiteRT model on ``x``, in a throwaway interpreter (for checks, not serving)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
    (source,) = interpreter.get_input_details()
    (target,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], x.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(target["index"]).copy()
