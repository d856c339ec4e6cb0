"""Forward passes: the LiteRT export run by the interpreter (the default), or a Keras model on TensorFlow.

A forward function takes float32 ``(n, 224, 224, 3)`` and returns ``(n, len(labels))`` probabilities. The
batcher calls it from one thread at a time.

How a batch is run is measured at load, not assumed: :func:`litert_forward` times a pass at each size and
cuts larger batches into passes of the cheapest size per image. On the 2-vCPU machines this project runs
on, a pass of one image on both threads is the cheapest per image (13.0 ms, against 16.9 ms per image at
16), and two single-threaded interpreters working in parallel were slower still (15.5 ms per image: the two
vCPUs share one core's caches), so that alternative was measured and left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from shared.images import MODEL_SIZE
from shared.quiet import filtered_stderr

log = logging.getLogger(__name__)

WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16)


class LiteRtForward:
    """A LiteRT interpreter as the forward function; re-allocates only when the pass size changes.

    A batch larger than ``chunk`` runs as consecutive passes of ``chunk`` images: on a small CPU a large
    batch costs *more* per image (its activations leave the caches), so the batcher's batches are cut to
    the size that :func:`litert_forward` measured to be cheapest. Not thread-safe (one interpreter, one
    set of buffers): the batcher calls it from one thread.
    """

    def __init__(self, flatbuffer: bytes, threads: int, chunk: int = 1 << 16) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._flatbuffer = flatbuffer  # the interpreter reads the model from this buffer
        # The first allocation applies the XNNPACK delegate, which LiteRT announces on fd 2 ("INFO: Created
        # TensorFlow Lite XNNPACK delegate for CPU."): kept off the console, anything else it prints is not.
        with filtered_stderr():
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
            self._interpreter.allocate_tensors()
        (source,) = self._interpreter.get_input_details()
        (target,) = self._interpreter.get_output_details()
        self._input, self._output = source["index"], target["index"]
        self._rows = int(source["shape"][0])
        self.chunk = chunk

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= self.chunk:
            return self._pass(x)
        return np.concatenate([self._pass(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])

    def _pass(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._rows:
            self._interpreter.resize_tensor_input(self._input, x.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._rows = x.shape[0]
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy: the next pass reuses the buffers


def _per_image(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> float:
    """Seconds per image of one pass of ``x``, after a pass of the same size (buffers sized, caches warm)."""
    run(x)
    started = time.perf_counter()
    run(x)
    return (time.perf_counter() - started) / len(x)


def litert_forward(flatbuffer: bytes, threads: int, rounds: int = 2) -> LiteRtForward:
    """The LiteRT model as the forward function, warmed up, its pass size set to the cheapest per image."""
    forward = LiteRtForward(flatbuffer, threads)
    sizes = sorted(WARMUP_BATCH_SIZES, reverse=True)
    inputs = {n: np.zeros((n, MODEL_SIZE, MODEL_SIZE, 3), np.float32) for n in sizes}
    per_image = {n: float("inf") for n in sizes}
    for _ in range(rounds):  # interleaved, best of rounds: the least disturbed by other processes
        for n in sizes:
            per_image[n] = min(per_image[n], _per_image(forward._pass, inputs[n]))
    forward.chunk = min(per_image, key=per_image.get)
    log.info(
        "LiteRT with %d threads: ms per image by pass size %s; passes of at most %d",
        threads,
        {n: round(t * 1000, 2) for n, t in sorted(per_image.items())},
        forward.chunk,
    )
    return forward


def compile_forward(keras_model) -> Callable[[np.ndarray], np.ndarray]:
    """The model as one traced ``tf.function`` with a fixed input signature, warmed for common batch sizes.

    Calling it costs a fraction of ``model.predict`` (no per-call dataset and callbacks machinery).
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32)], reduce_retracing=True)
    def traced(x):
        return keras_model(x, training=False)

    def forward(x: np.ndarray) -> np.ndarray:
        return traced(tf.convert_to_tensor(x, tf.float32)).numpy()

    for n in WARMUP_BATCH_SIZES:
        forward(np.zeros((n, MODEL_SIZE, MODEL_SIZE, 3), np.float32))
    return forward
