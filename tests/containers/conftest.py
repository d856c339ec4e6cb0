"""Fixtures of the container tests: the images the images check built (``.ci/images``), the engine.

When that check did not run here for this commit (no ``var/ci/images.json``, or one of another revision), the
session runs it first (it needs root: it may install and start the engine); it failing, an engine that does not
answer or an image that does not work is a failure, never a skip.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import ARTIFACTS
from tests.containers.docker import MANIFEST, REPO, Docker, Images


def _head() -> str | None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False)
    return head.stdout.strip() if head.returncode == 0 else None


@pytest.fixture(scope="session")
def images() -> Images:
    images = Images.from_manifest()
    head = _head()
    if images is None or (head is not None and images.revision != head):
        log = ARTIFACTS / "ci-images.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:  # builds what changed only: seconds when little did
            done = subprocess.run(["bash", ".ci/images"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            pytest.fail(
                f"bash .ci/images failed ({done.returncode}; it needs root and Debian's docker.io): "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        images = Images.from_manifest()
    assert images is not None, f"bash .ci/images wrote no {MANIFEST}"
    if head is not None and images.revision != head:
        pytest.fail(
            f"the images were built from {images.revision[:12]}, the checkout is at {head[:12]}: "
            "testing images of other code would prove nothing"
        )
    return images


@pytest.fixture(scope="session")
def docker(images: Images) -> Iterator[Docker]:
    client = Docker(images.docker)
    client("info")
    yield client
    client.cleanup()
