"""``python -m services.api [--host H] [--port P] [--workers N]``: run the API under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import uvicorn

from services.api.settings import ApiSettings


def main(argv: Sequence[str] | None = None) -> int:
    settings = ApiSettings()
    parser = argparse.ArgumentParser(prog="python -m services.api", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--workers", type=int, default=settings.workers)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        "services.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=25,
        access_log=False,
    )
    return 0
