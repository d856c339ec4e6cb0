"""The served network: the seed's 224 x 224 contract, the pretrained backbone, and the linear head.

Serving contract: input float32 ``(-1, 224, 224, 3)`` in [0, 1] (the seed's), output the probability of
each class in :data:`shared.labels.LABELS` order. Inside, the image is resized to the backbone's working
side (upsampling the contract's 224 px lets the ImageNet features see small flower heads at a scale they
know), normalised as EfficientNet-Lite expects, pooled to 1280 features, and classified by one softmax
layer. The feature extractor the embeddings are computed with (:mod:`extractor`) is the LiteRT conversion of the
front of this model (same layers, same weights), so the head is trained on the features it will be served.
Only built-in Keras layers and ``keras.ops`` are used: any MLflow/Keras installation loads the model.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from services.trainer.head import SoftmaxHead
from shared.images import MODEL_SIZE
from shared.labels import LABELS


def feature_model(backbone: keras.Model, resolution: int) -> keras.Model:
    """``(-1, 224, 224, 3)`` in [0, 1] -> pooled backbone features ``(-1, 1280)``."""
    inputs = keras.Input((MODEL_SIZE, MODEL_SIZE, 3), name="image", dtype="float32")
    x = inputs
    if resolution != MODEL_SIZE:
        x = keras.layers.Resizing(resolution, resolution, interpolation="bilinear", name="resize")(x)
    # EfficientNet-Lite's normalisation: (pixel - 127) / 128 on the 0-255 scale.
    x = keras.layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(x)
    return keras.Model(inputs, backbone(x), name="features")


def feature_map_model(features: keras.Model) -> keras.Model:
    """The same layers as ``features`` up to the backbone's last feature map, before pooling: ``(-1, g, g, 1280)``
    (``g`` = the working side / 32). What the class activation map is computed from."""
    backbone = next(layer for layer in features.layers if isinstance(layer, keras.Model))
    before_pooling = keras.Model(backbone.input, backbone.get_layer("pool").input, name="feature_map")
    inputs = features.input
    x = inputs
    for layer in features.layers[1:]:
        x = before_pooling(x) if layer is backbone else layer(x)
    return keras.Model(inputs, x, name="features_map")


def serving_model(features: keras.Model, head: SoftmaxHead) -> keras.Model:
    """The exported model: float32 ``(-1, 224, 224, 3)`` in [0, 1] -> the calibrated probabilities of
    :data:`LABELS` (one softmax ``Dense`` layer on the pooled features, the head's standardisation and calibration
    folded in). What MLflow clients and ``mlflow models serve`` run; the LiteRT export adds columns to it."""
    classifier = keras.layers.Dense(len(LABELS), activation="softmax", name="probabilities")
    classifier.build((None, features.output_shape[-1]))
    classifier.set_weights(list(head.dense_weights()))
    inputs = keras.Input((MODEL_SIZE, MODEL_SIZE, 3), name="image", dtype="float32")
    return keras.Model(inputs, classifier(features(inputs)), name="dandelion_grass")


def traced(model: keras.Model, batch_size: int = 16) -> Callable[[np.ndarray], np.ndarray]:
    """``x`` (float32 ``(n, 224, 224, 3)``) -> ``model``'s outputs, in batches, through one traced graph.

    Not ``model.predict`` (per-call overhead) nor eager calls: eager calls of this network at 288 px held
    gigabytes of intermediate tensors (5 GB at batch 32), past the trainer's 6 GiB memory limit.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32)])
    def call(batch):
        return model(batch, training=False)

    def compute(x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros((0, model.output_shape[-1]), np.float32)
        return np.concatenate([call(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)])

    return compute


def extractor(features: keras.Model, batch_size: int = 16) -> Callable[[np.ndarray], np.ndarray]:
    """``x`` -> pooled features (see :func:`traced`)."""
    return traced(features, batch_size)
