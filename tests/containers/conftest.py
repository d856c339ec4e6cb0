"""Fixtures of the container tests: the images the images check built (``.ci/images``), the engine.

They skip only when that check did not run here (no ``var/ci/images.json``); once it has, an engine that
does not answer or an image that does not work is a failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.containers.docker import MANIFEST, Docker, Images


@pytest.fixture(scope="session")
def images() -> Images:
    images = Images.from_manifest()
    if images is None:
        pytest.skip(f"the images check did not run on this machine (no {MANIFEST}): bash .ci/images builds them")
    return images


@pytest.fixture(scope="session")
def docker(images: Images) -> Iterator[Docker]:
    client = Docker(images.docker)
    client("info")
    yield client
    client.cleanup()
