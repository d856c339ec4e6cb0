"""A quiet API start: no raw LiteRT line on the console, and a one-line open-feedback warning on loopback binds
(the full one where others can reach the API)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from services.api.app import is_loopback
from services.api.settings import ApiSettings
from tests.api.test_prediction_log import serving
from tests.conftest import REPO

XNNPACK = "Created TensorFlow Lite XNNPACK delegate"


@pytest.fixture(scope="module")
def tiny_litert() -> bytes:
    """A one-layer LiteRT model: enough for the interpreter to apply (and announce) its XNNPACK delegate."""
    from shared.quiet import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    class Dense(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 8), tf.float32)])
        def __call__(self, x):
            return tf.nn.softmax(tf.matmul(x, tf.ones((8, 2))))

    module = Dense()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    return converter.convert()


BARE = """
import sys
from ai_edge_litert.interpreter import Interpreter
Interpreter(model_path=sys.argv[1], num_threads=1).allocate_tensors()
"""
OURS = """
import json, sys
import numpy as np
from services.api.forward import LiteRtForward
forward = LiteRtForward(open(sys.argv[1], "rb").read(), threads=1)
print(json.dumps(forward(np.zeros((3, 8), np.float32)).tolist()))
"""


def test_the_interpreter_announces_its_delegate_on_fd_2_but_not_through_the_api(tiny_litert: bytes, tmp_path) -> None:
    """Each in a fresh process with the console's environment (a process where TensorFlow's logging was already
    set up, as in a long test session, may not print the line at all, and would check nothing)."""
    model = tmp_path / "tiny.tflite"
    model.write_bytes(tiny_litert)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}

    def run(code: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    assert XNNPACK in run(BARE).stderr, "the line this test hides is not printed here: it checks nothing"
    ours = run(OURS)
    assert XNNPACK not in ours.stderr, ours.stderr[-2000:]
    answers = np.array(json.loads(ours.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(answers, np.full((3, 2), 0.5), atol=1e-6)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True), ("0.0.0.0", False),
     ("::", False), ("10.1.2.3", False), ("api.example", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def open_feedback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "POST /feedback is open" in r.getMessage()]


async def test_open_feedback_on_loopback_is_one_short_line(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.api.app"):
        async with serving(api_settings):
            pass
    (warning,) = open_feedback_warnings(caplog)
    assert warning == (
        "POST /feedback is open (no API_FEEDBACK_TOKEN): fine on 127.0.0.1, set one before exposing the API"
    )


async def test_open_feedback_on_every_address_gets_the_full_warning(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = api_settings.model_copy(update={"host": "0.0.0.0"})
    with caplog.at_level(logging.WARNING, logger="services.api.app"):
        async with serving(settings):
            pass
    (warning,) = open_feedback_warnings(caplog)
    assert warning.startswith("POST /feedback is open (API_FEEDBACK_TOKEN is unset) on 0.0.0.0: anyone who reaches")
    assert "Set API_FEEDBACK_TOKEN" in warning
