"""The serving model as a LiteRT flatbuffer: what the API runs without TensorFlow in its process.

TensorFlow alone costs the serving process about 700 MB and seconds of start-up; the LiteRT interpreter
(``ai-edge-litert``) runs the same graph in a few tens of MB. Conversions are float32 with no quantization, and
every one is checked against Keras (and NumPy) before it is returned, so a model whose LiteRT twin would answer
differently is never registered.

The export answers more than the two probabilities, all from one pass of the backbone (:data:`OUTPUTS`): the
in-domain distance, P(neither), and the class activation map (the calibrated dandelion-vs-grass logit at each cell
of the last feature map: its mean plus the bias is the logit the answer came from).
"""

from __future__ import annotations

import numpy as np

from services.trainer.head import SoftmaxHead, neither_probability
from services.trainer.indomain import DomainModel
from shared.images import MODEL_SIZE
from shared.labels import LABELS

LITERT_FILE = "model.tflite"
"""Name of the file inside the logged model (MLflow keeps ``extra_files`` under ``extra_files/``)."""
TOLERANCE = 1e-5
"""Largest difference in any probability between Keras and LiteRT that the export accepts."""


class ExportError(RuntimeError):
    """The LiteRT model does not reproduce the Keras model."""


def outputs(grid: int) -> dict[str, object]:
    """Where each answer is in the export's output row (the model metadata carries this; the API reads it)."""
    served = len(LABELS)
    return {
        "probabilities": [0, served],
        "domain_distance": served,
        "neither": served + 1,
        "explain": {"start": served + 2, "grid": [grid, grid]},
        "columns": served + 2 + grid * grid,
    }


def _convert(function, trackable) -> bytes:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Weights frozen into constants here: left to the converter, some Keras models (a plain Conv2D + Dense one
    # was enough) came out with their weights as uninitialised resource variables, answering garbage.
    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], trackable)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []  # float32 throughout: the answers must equal the Keras model's
    return converter.convert()


def _probe() -> np.ndarray:
    return np.random.default_rng(0).random((3, MODEL_SIZE, MODEL_SIZE, 3), dtype=np.float32)


def frozen_litert(keras_model, tolerance: float = 1e-4) -> bytes:
    """Any ``(-1, 224, 224, 3)`` Keras model as LiteRT, checked against Keras on a fixed random batch."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32, name="image")])
    def serve(x):
        return keras_model(x, training=False)

    flatbuffer = _convert(serve, keras_model)
    probe = _probe()
    expected = np.asarray(keras_model(tf.constant(probe), training=False))
    difference = float(np.abs(run_litert(flatbuffer, probe) - expected).max())
    if not difference <= tolerance * max(1.0, float(np.abs(expected).max())):
        raise ExportError(f"LiteRT differs from Keras by {difference:.3g}")
    return flatbuffer


def litert_model(
    served,
    feature_map,
    head: SoftmaxHead,
    domain: DomainModel,
    probe: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
) -> bytes:
    """The served model ``served`` (Keras, probabilities only) as LiteRT with :data:`outputs`'s extra columns,
    computed from ``feature_map`` (its front, up to the last feature map) and the head's weights. Only built-in
    LiteRT operators; checked within ``tolerance`` against Keras for the probabilities and against NumPy
    (:class:`DomainModel`, :class:`SoftmaxHead`) for the rest, on ``probe`` (default: a fixed random batch)."""
    import tensorflow as tf

    kernel, bias = head.raw()
    served_kernel, served_bias = head.dense_weights()
    evidence = tf.constant(served_kernel[:, 0] - served_kernel[:, 1], tf.float32)  # dandelion minus grass
    all_kernel, all_bias = tf.constant(kernel), tf.constant(bias)
    two_kernel, two_bias = tf.constant(served_kernel), tf.constant(served_bias)
    bank = tf.constant(domain.bank.rows.T, tf.float32)  # (features, entries): one matrix product per image
    entries = domain.bank.entries_for(domain.k)
    refused = len(head.classes) > len(LABELS)

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32, name="image")])
    def serve(x):
        cells = feature_map(x, training=False)  # (n, g, g, features): one pass of the backbone for everything
        pooled = tf.reduce_mean(cells, axis=[1, 2])
        probabilities = tf.nn.softmax(tf.matmul(pooled, two_kernel) + two_bias)
        unit = pooled / tf.maximum(tf.norm(pooled, axis=1, keepdims=True), 1e-12)
        distance = 1.0 - tf.math.top_k(tf.matmul(unit, bank), k=entries).values[:, -1:]
        if refused:
            everything = tf.nn.softmax(tf.matmul(pooled, all_kernel) + all_bias)
            neither = 1.0 - tf.reduce_sum(everything[:, : len(LABELS)], axis=1, keepdims=True)
        else:
            neither = tf.zeros_like(distance)
        activation = tf.reshape(tf.tensordot(cells, evidence, axes=[[3], [0]]), (tf.shape(x)[0], -1))
        return tf.concat([probabilities, distance, neither, activation], axis=1)

    flatbuffer = _convert(serve, served)

    probe = _probe() if probe is None else probe
    got = run_litert(flatbuffer, probe)
    probabilities = np.asarray(served(tf.constant(probe), training=False))
    cells = np.asarray(feature_map(tf.constant(probe), training=False))
    pooled = cells.mean(axis=(1, 2))
    logits = pooled @ kernel + bias
    grid = cells.shape[1]
    expected = np.concatenate(
        [
            probabilities,
            domain.distances(pooled)[:, None],
            (neither_probability(logits) if refused else np.zeros(len(probe)))[:, None],
            (cells @ (served_kernel[:, 0] - served_kernel[:, 1])).reshape(len(probe), grid * grid),
        ],
        axis=1,
    )
    layout = outputs(grid)
    if got.shape != expected.shape or got.shape[1] != layout["columns"]:
        raise ExportError(f"LiteRT answers {got.shape}, expected {expected.shape}")
    answers = slice(0, len(LABELS) + 2)
    difference = float(np.abs(got[:, answers] - expected[:, answers]).max())
    activation = float(np.abs(got[:, answers.stop :] - expected[:, answers.stop :]).max())
    scale = max(1.0, float(np.abs(expected[:, answers.stop :]).max()))
    if not difference <= tolerance or not activation <= tolerance * 100 * scale:
        raise ExportError(
            f"LiteRT differs from Keras by {difference:.3g} (answers; tolerance {tolerance:g}) and {activation:.3g} "
            "(activation map)"
        )
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
