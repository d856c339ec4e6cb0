"""The trainer's console filter: native chatter dropped, everything else written back in order."""

from __future__ import annotations

import os
import sys

import pytest

from shared.quiet import filtered_stderr


def test_chatter_is_dropped_and_real_messages_are_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 a real native error\n")
        print("a Python warning", file=sys.stderr, flush=True)
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    err = capfd.readouterr().err  # (pytest's sys.stderr bypasses fd 2, so only the lines are compared)
    assert sorted(err.splitlines()) == ["E0000 a real native error", "a Python warning"]


def test_an_exception_still_restores_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    def fail_inside() -> None:
        with filtered_stderr():
            os.write(2, b"said before failing\n")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_inside()
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "said before failing\nafter\n"
