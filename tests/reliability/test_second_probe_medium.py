"""The second hostile probe's MEDIUM and LOW findings (issue #23) against a real API process (the API's own CLI,
serving the fake model: what is measured here is the HTTP layer, the parsers and memory, not the network)."""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ARTIFACTS
from tests.servers import free_port, running

MIB = 1 << 20


@dataclass(frozen=True)
class Api:
    url: str
    port: int
    pid: int
    tmp: Path


def start_fake_api(tmp: Path, log: str, **env: str) -> Iterator[Api]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tests.reliability.fake_api", "--host", "127.0.0.1", "--port", str(port)]
    environment = {"TMPDIR": str(tmp), "API_PREDICTION_LOG": "false", **env}
    ready = lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200  # noqa: E731
    with running(argv, ready=ready, log=ARTIFACTS / log, env=environment, what="the API") as process:
        yield Api(url, port, process.pid, tmp)


@pytest.fixture(scope="module")
def fake_api(tmp_path_factory) -> Iterator[Api]:
    yield from start_fake_api(tmp_path_factory.mktemp("api-tmp"), "api-second-probe-medium.log")


def status_mib(pid: int, key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def bytes_in(pid: int, folder: Path) -> int:
    """Bytes of every file ``pid`` holds open under ``folder``, unlinked ones included (a spooled upload is an
    anonymous temporary file that no directory listing shows)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += fd.stat().st_size
        except OSError:
            continue
    return total


def post_raw(port: int, path: str, headers: dict[str, str], body_chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Send a request chunk by chunk, stopping as soon as the server answers (as a client that reads while
    it writes does); the status and the answer's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: api\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n")
        answer = b""
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            while not _complete(answer):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def _complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(found) and (length is None or len(body) >= int(length[1]))


def multipart_upload(size: int, boundary: str = "probeboundary") -> tuple[dict[str, str], Iterator[bytes]]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + 4 + size + len(tail)),
    }

    def chunks() -> Iterator[bytes]:
        yield head + b"\xff\xd8\xff\xe0"
        block = b"\0" * MIB
        for _ in range(size // MIB):
            yield block
        yield tail

    return headers, chunks()


# ---------------------------------------------------------------- MEDIUM 1: multipart parts while streaming


def test_big_uploads_are_refused_while_streaming_and_never_reach_the_temp_folder(fake_api: Api) -> None:
    """16 clients at once each send one 60 MiB part (the per-file limit is 10 MiB, the body limit 64 MiB): each
    gets 413, nothing is written under the process's TMPDIR, and the process holds at most its upload budget.
    Before: each part was spooled to /tmp in full before its size was looked at (962 MiB in /tmp)."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(bytes_in(fake_api.pid, fake_api.tmp))
            time.sleep(0.01)

    def upload(_: int) -> tuple[int, bytes]:
        headers, chunks = multipart_upload(60 * MIB)
        return post_raw(fake_api.port, "/predict", headers, chunks)

    before = status_mib(fake_api.pid, "VmRSS")
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(upload, range(16)))
    finally:
        done.set()
        sampler.join()
    assert [status for status, _ in answers] == [413] * 16, [a[:200] for _, a in answers]
    assert all(b"10 MiB" in answer for _, answer in answers)
    assert samples and max(samples) == 0, f"{max(samples) / MIB:.0f} MiB spooled to the temp folder"
    grown = status_mib(fake_api.pid, "VmHWM") - before
    assert grown < 16 * 10 + 100, f"the uploads grew the process by {grown:.0f} MiB"
    assert httpx.get(f"{fake_api.url}/health/ready").status_code == 200


def test_the_upload_budget_answers_503_beyond_it(tmp_path) -> None:
    """With a 4 MiB budget for all uploads in progress, a request whose files would pass it is refused with
    503 and Retry-After as its bytes arrive (the files themselves are within their own limit)."""
    for api in start_fake_api(tmp_path, "api-upload-budget.log", API_UPLOAD_BUFFER_BYTES=str(4 * MIB)):
        files = [("file", (f"{i}.jpg", b"\xff\xd8" + b"\0" * (3 * MIB))) for i in range(2)]
        answer = httpx.post(f"{api.url}/predict", files=files, timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert "4 MiB" in answer.json()["message"]
        small = httpx.post(f"{api.url}/predict", files=files[:1], timeout=30)
        assert small.status_code == 400, small.text  # within the budget: read, then refused as no image
