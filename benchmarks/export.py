"""``python -m benchmarks.export``: what each part of the served LiteRT export costs in its forward pass.

The export answers more than the two probabilities (:mod:`services.trainer.export`): the in-domain distance (a
matrix product with the bank and a top-k), P(neither) (the head over every kind it was trained on) and the class
activation map (the backbone's last feature map, before pooling, times the head's evidence). This builds the
backbone with its real ImageNet weights, converts one network per step, each adding one part to the one before,
and times one forward pass at batch 1 as the API runs it (LiteRT, XNNPACK, ``--threads``), at each resolution,
the steps interleaved round by round so that a busy machine disturbs them alike. The head and the bank are random
numbers of the served shapes: the cost does not depend on their values.

Prints one row per step and resolution: the median ms of a pass, and its ratio to the first step (the backbone
and the probabilities alone, what the export was before the extra outputs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from shared.images import MODEL_SIZE

STEPS = ("probabilities", "+ feature map", "+ in-domain distance", "+ neither", "+ activation map")
"""Each network is the one before it plus one part; the last is what the trainer exports."""
BANK_VIEWS = 512
KINDS = 6
"""Served shapes: the bank's views (:data:`services.trainer.indomain.BANK_VIEWS`), the head's classes (the two
and four refused kinds)."""


def networks(resolution: int, variant_name: str = "lite0") -> dict[str, Callable]:
    """One ``tf.function`` per step of :data:`STEPS`, on the real backbone at ``resolution``."""
    import tensorflow as tf

    from services.trainer import backbone
    from services.trainer.model import feature_map_model, feature_model

    variant = backbone.VARIANTS[variant_name]
    features = feature_model(backbone.build(variant, backbone.load_weights(variant)), resolution)
    cells_of = feature_map_model(features)
    rng = np.random.default_rng(0)
    width = int(features.output_shape[-1])
    two = tf.constant(rng.normal(size=(width, 2)).astype(np.float32))
    every = tf.constant(rng.normal(size=(width, KINDS)).astype(np.float32))
    bank = tf.constant(rng.normal(size=(width, BANK_VIEWS)).astype(np.float32))
    evidence = tf.constant(rng.normal(size=(width,)).astype(np.float32))
    spec = [tf.TensorSpec((None, MODEL_SIZE, MODEL_SIZE, 3), tf.float32, name="image")]

    def step(upto: int) -> Callable:
        @tf.function(input_signature=spec)
        def serve(x):
            if upto == 0:
                return tf.nn.softmax(tf.matmul(features(x, training=False), two))
            cells = cells_of(x, training=False)
            pooled = tf.reduce_mean(cells, axis=[1, 2])
            out = [tf.nn.softmax(tf.matmul(pooled, two))]
            if upto >= 2:
                unit = pooled / tf.maximum(tf.norm(pooled, axis=1, keepdims=True), 1e-12)
                out.append(1.0 - tf.math.top_k(tf.matmul(unit, bank), k=5).values[:, -1:])
            if upto >= 3:
                out.append(1.0 - tf.reduce_sum(tf.nn.softmax(tf.matmul(pooled, every))[:, :2], axis=1, keepdims=True))
            if upto >= 4:
                out.append(tf.reshape(tf.tensordot(cells, evidence, axes=[[3], [0]]), (tf.shape(x)[0], -1)))
            return tf.concat(out, axis=1)

        return serve

    return {name: (step(i), features) for i, name in enumerate(STEPS)}


def convert(function: Callable, trackable) -> bytes:
    from services.trainer.export import _convert
    from shared.quiet import filtered_stderr

    with filtered_stderr():
        return _convert(function, trackable)


class Pass:
    """One LiteRT interpreter at batch 1, as the API sets it up."""

    def __init__(self, flatbuffer: bytes, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from shared.quiet import filtered_stderr

        self._flatbuffer = flatbuffer
        with filtered_stderr():
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        (source,) = self._interpreter.get_input_details()
        (self._target,) = self._interpreter.get_output_details()
        self._input = source["index"]
        self._interpreter.resize_tensor_input(self._input, (1, MODEL_SIZE, MODEL_SIZE, 3), strict=True)
        self._interpreter.allocate_tensors()
        self._x = np.random.default_rng(1).random((1, MODEL_SIZE, MODEL_SIZE, 3), dtype=np.float32)

    def seconds(self) -> float:
        started = time.perf_counter()
        self._interpreter.set_tensor(self._input, self._x)
        self._interpreter.invoke()
        self._interpreter.get_tensor(self._target["index"])
        return time.perf_counter() - started


def measure(resolutions: list[int], threads: int, rounds: int, repeats: int) -> list[dict[str, object]]:
    rows = []
    for resolution in resolutions:
        passes = {name: Pass(convert(*built), threads) for name, built in networks(resolution).items()}
        times: dict[str, list[float]] = {name: [] for name in passes}
        for one in passes.values():  # warm-up: buffers sized, caches warm
            for _ in range(5):
                one.seconds()
        for _ in range(rounds):
            for name, one in passes.items():
                times[name].extend(one.seconds() for _ in range(repeats))
        base = statistics.median(times[STEPS[0]])
        for name in passes:
            ms = statistics.median(times[name]) * 1000
            rows.append({"resolution": resolution, "step": name, "ms": ms, "ratio": ms / (base * 1000)})
    return rows


def table(rows: list[dict[str, object]], threads: int) -> str:
    lines = [
        f"LiteRT forward pass at batch 1, {threads} thread(s), median of interleaved rounds",
        "",
        "| resolution | network | ms | / probabilities only |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['resolution']} | {r['step']} | {r['ms']:.2f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from services.trainer.settings import TrainerSettings

    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default=f"{TrainerSettings().resolution},{MODEL_SIZE}")
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads (the API uses one per core)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20, help="passes of each network per round")
    args = parser.parse_args(argv)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    print(table(measure(resolutions, args.threads, args.rounds, args.repeats), args.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
