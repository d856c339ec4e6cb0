"""``python -m services.api.payload PHOTO...``: an MLflow scoring request for photos, on standard output.

The photos go through the one preprocessing (:func:`shared.images.preprocess`), so ``/invocations`` (or
``mlflow models serve``) sees exactly what ``/predict`` would. Pipe it to curl; nothing is written to disk::

    python -m services.api.payload photo.jpg | curl -H 'Content-Type: application/json' --data-binary @- \\
        http://127.0.0.1:8000/invocations
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson

from shared.images import ImageError, preprocess


def payload(photos: Sequence[bytes], decimals: int = 4) -> bytes:
    """``{"inputs": [...]}`` for the photos, pixel values rounded to ``decimals`` (a 224 x 224 photo: ~1 MB)."""
    inputs = np.stack([preprocess(data) for data in photos]).round(decimals)
    return orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.api.payload", description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+", type=Path, help="photo files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    args = parser.parse_args(argv)
    try:
        body = payload([path.read_bytes() for path in args.photos])
    except (OSError, ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
