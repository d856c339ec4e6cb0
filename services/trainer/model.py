"""The network: a small residual CNN trained from scratch, and the serving model exported around it.

Serving contract: input float32 ``(-1, 224, 224, 3)`` in [0, 1] (the seed's), output the probability of
each class in :data:`shared.labels.LABELS` order. The network works at ``image_size`` inside (a resize
layer), augments only while training, and the exported model averages the image and its mirror image
(test-time augmentation) inside its own forward pass, so every client gets the same answer.
Only built-in Keras layers and ``keras.ops`` are used: any MLflow/Keras installation loads the model.
"""

from __future__ import annotations

import keras

from shared.images import MODEL_SIZE
from shared.labels import LABELS

BN_MOMENTUM = 0.9
"""A few hundred steps per training: the default 0.99 would leave the moving statistics near their start."""


def augmentation(seed: int) -> keras.Sequential:
    """Random, label-preserving changes; active only in training (Keras disables them at inference)."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.08, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom((-0.25, 0.1), fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
            keras.layers.RandomContrast(0.25, seed=seed + 4),
            keras.layers.RandomBrightness(0.15, value_range=(0.0, 1.0), seed=seed + 5),
        ],
        name="augment",
    )


def _block(x: keras.KerasTensor, filters: int, weight_decay: float, name: str) -> keras.KerasTensor:
    """Two separable 3x3 convolutions with a strided shortcut: halves resolution, keeps gradients flowing."""
    reg = keras.regularizers.l2(weight_decay) if weight_decay else None
    shortcut = keras.layers.Conv2D(filters, 1, strides=2, use_bias=False, kernel_regularizer=reg, name=f"{name}_proj")(
        x
    )
    shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep1")(x)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu1")(y)
    y = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep2")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    y = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(y)
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def build_network(
    image_size: int = 128,
    seed: int = 0,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    dropout: float = 0.3,
    weight_decay: float = 0.0,
) -> keras.Model:
    """The trainable network: 224 x 224 input, resize, augment, stem, residual blocks, softmax."""
    inputs = keras.Input((MODEL_SIZE, MODEL_SIZE, 3), name="image")
    x = keras.layers.Resizing(image_size, image_size, name="resize")(inputs)
    x = augmentation(seed)(x)
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="center")(x)
    x = keras.layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    for i, filters in enumerate(widths[1:], start=1):
        x = _block(x, filters, weight_decay, name=f"block{i}")
        x = keras.layers.Activation("relu", name=f"block{i}_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="dandelion_grass_cnn")


def serving_model(network: keras.Model, tta: bool = True) -> keras.Model:
    """The exported model: the trained network, averaged over the image and its mirror when ``tta``."""
    inputs = keras.Input((MODEL_SIZE, MODEL_SIZE, 3), name="image", dtype="float32")
    probabilities = network(inputs, training=False)
    if tta:
        mirrored = network(keras.ops.flip(inputs, axis=2), training=False)
        probabilities = keras.layers.Average(name="tta_mean")([probabilities, mirrored])
    return keras.Model(inputs, probabilities, name="dandelion_grass_serving")
