"""The second hostile probe's HIGH findings (issue #23), against the real API process serving the real champion:
small uploads that decoded to gigabytes, Ghostscript run on uploaded EPS, idle sockets that starved the probes."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from shared import images
from tests.conftest import ARTIFACTS, api_env
from tests.servers import free_port, running
from tests.shared.test_images import REFUSED_FORMATS, other_format

pytestmark = pytest.mark.slow

GIB = 1 << 30
HEADER_TIMEOUT_S = 2.0
LIMIT = 16


@pytest.fixture(scope="module")
def fake_gs(tmp_path_factory) -> tuple[Path, Path]:
    """A ``gs`` first on PATH that records every call: Pillow's EPS plugin runs whatever ``gs`` it finds."""
    folder = tmp_path_factory.mktemp("fake-gs")
    record = folder / "calls"
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 1\n')
    gs.chmod(0o755)
    return folder, record


@pytest.fixture(scope="module")
def probed_api(real_champion, fake_gs) -> Iterator[tuple[str, int]]:
    """The API process (url, pid) with the probe's concurrency limit and a short header deadline."""
    settings, _ = real_champion
    folder, _ = fake_gs
    env = api_env(
        settings.registry,
        PATH=f"{folder}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        API_LIMIT_CONCURRENCY=str(LIMIT),
        API_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)]
    ready = lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200  # noqa: E731
    with running(argv, ready=ready, log=ARTIFACTS / "api-second-probe.log", env=env, what="the API") as process:
        yield url, process.pid


def status_mib(pid: int, key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def saved(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def probe_bodies() -> dict[str, bytes]:
    """The probe's table: each a few hundred KB at most, each ~1 GB of decode before the fix."""
    return {
        "16-bit PNG 6300x6300": saved(Image.new("I;16", (6300, 6300)), "PNG", optimize=True),
        "float TIFF": saved(
            Image.fromarray(np.zeros((6300, 6300), np.float32), "F"), "TIFF", compression="tiff_adobe_deflate"
        ),
        "RGBA PNG 40 MP": saved(Image.new("RGBA", (6324, 6324)), "PNG", optimize=True),
        "lossless WebP": saved(Image.new("RGB", (6324, 6324)), "WEBP", lossless=True),
    }


def test_the_probe_uploads_keep_the_process_under_a_gibibyte(probed_api) -> None:
    """Every row of the probe, three files a request, eight requests at once: a clear 413 or a right 200,
    and the process's peak RSS stays under 1 GiB (it reached 3.9 GiB)."""
    url, pid = probed_api

    def post(data: bytes) -> httpx.Response:
        return httpx.post(f"{url}/predict", files=[("file", ("probe", data))] * 3, timeout=60)

    for name, data in probe_bodies().items():
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, [data] * 8))
        for answer in answers:
            assert answer.status_code in (200, 413), (name, answer.status_code, answer.text[:200])
            if answer.status_code == 413:
                assert "MiB" in answer.json()["message"], answer.text  # says what the decode would need
            else:
                assert {a["label"] for a in answer.json()} <= {"dandelion", "grass"}
    peak = status_mib(pid, "VmHWM")
    assert peak < GIB / 2**20, f"peak RSS {peak:.0f} MiB"
    assert httpx.get(f"{url}/health/ready").status_code == 200


def test_ghostscript_is_never_run_and_other_formats_are_refused_with_the_list(probed_api, fake_gs) -> None:
    url, _ = probed_api
    folder, record = fake_gs
    for fmt in REFUSED_FORMATS:
        answer = httpx.post(f"{url}/predict", files={"file": (f"x.{fmt.lower()}", other_format(fmt))}, timeout=30)
        assert answer.status_code in (415, 400), (fmt, answer.status_code)
        assert images.ACCEPTED in answer.json()["message"], answer.text
    assert httpx.post(f"{url}/predict", files={"file": ("loop.eps", other_format("EPS"))}).status_code == 415
    assert not record.exists(), f"gs was run: {record.read_text()}"
    # The trap works: Pillow left to itself runs the fake gs on the same file.
    control = "import io, sys; from PIL import Image; Image.open(io.BytesIO(sys.stdin.buffer.read())).load()"
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-c", control], input=other_format("EPS"), env=env, capture_output=True)
    assert record.exists()


def test_idle_sockets_are_closed_at_the_deadline_and_probes_stay_up(probed_api) -> None:
    """512 sockets that send nothing and 16 that send half a request: liveness and readiness answer 200
    throughout, a photo is classified meanwhile, and every socket is closed within the header deadline
    (+1 s). Before: 16 idle sockets made /health/live answer 503 for as long as they stayed."""
    url, _ = probed_api
    port = int(url.rsplit(":", 1)[1])
    opened = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(512)]
    half = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(LIMIT)]
    for s in half:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    try:
        statuses = []
        while time.monotonic() - opened < HEADER_TIMEOUT_S * 0.8:
            statuses += [httpx.get(f"{url}{path}", timeout=5).status_code for path in ("/health/live", "/health/ready")]
        photo = saved(Image.new("RGB", (64, 64), (240, 210, 30)), "JPEG")
        assert httpx.post(f"{url}/predict", files={"file": ("p.jpg", photo)}, timeout=10).status_code == 200
        assert set(statuses) == {200}, statuses
        for s in idle:
            assert s.recv(100) == b""
        for s in half:
            assert s.recv(100).startswith(b"HTTP/1.1 408"), "a half-sent request gets 408 before the close"
        closed_after = time.monotonic() - opened
        assert closed_after < HEADER_TIMEOUT_S + 1.0, f"the last socket closed {closed_after:.1f} s after opening"
    finally:
        for s in idle + half:
            s.close()
