"""Fixtures of the container tests: the images the images check built (``.ci/images``), the engine.

They skip only when that check did not run here (no ``var/ci/images.json``); once it has, images built from
another commit, an engine that does not answer or an image that does not work is a failure.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.containers.docker import MANIFEST, REPO, Docker, Images


@pytest.fixture(scope="session")
def images() -> Images:
    images = Images.from_manifest()
    if images is None:
        pytest.skip(f"the images check did not run on this machine (no {MANIFEST}): bash .ci/images builds them")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False)
    if head.returncode == 0 and images.revision != head.stdout.strip():
        pytest.fail(
            f"the images were built from {images.revision[:12]}, the checkout is at {head.stdout.strip()[:12]}: "
            "run bash .ci/images again (testing images of other code would prove nothing)"
        )
    return images


@pytest.fixture(scope="session")
def docker(images: Images) -> Iterator[Docker]:
    client = Docker(images.docker)
    client("info")
    yield client
    client.cleanup()
