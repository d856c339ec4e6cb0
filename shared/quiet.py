"""Native libraries' start-up chatter kept off the console, and nothing else.

TensorFlow's C++ side prints INFO lines through absl before Python's logging exists (``oneDNN custom
operations are on``, ``All log messages before absl::InitializeLog()``), whatever ``TF_CPP_MIN_LOG_LEVEL``
says, and LiteRT announces its XNNPACK delegate. They read like errors to a new user. :func:`filtered_stderr`
captures file descriptor 2 around the calls that print them and replays every line that is not such chatter,
so a real warning or error still reaches the console.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

CHATTER = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Created TensorFlow Lite XNNPACK delegate",
    "NodeDef mentions attribute use_unbounded_threadpool",
    # MLflow prints these itself; the trainer's summary says which version was registered.
    "Successfully registered model",
    "Created version '",
)


@contextlib.contextmanager
def filtered_stderr(chatter: tuple[str, ...] = CHATTER) -> Iterator[None]:
    """Run the body with fd 2 captured; afterwards write back every captured line that is not ``chatter``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded, closed): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not any(noise in line for noise in chatter)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow() -> None:
    """Import TensorFlow (and Keras) once, without its start-up chatter."""
    with filtered_stderr():
        import tensorflow  # noqa: F401
