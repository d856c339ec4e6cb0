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


def test_the_body_budget_answers_503_beyond_it(tmp_path) -> None:
    """With a 4 MiB budget for all uploads in progress, a request whose files would pass it is refused with
    503 and Retry-After as its bytes arrive (the files themselves are within their own limit)."""
    for api in start_fake_api(tmp_path, "api-upload-budget.log", API_BODY_BUFFER_BYTES=str(4 * MIB)):
        files = [("file", (f"{i}.jpg", b"\xff\xd8" + b"\0" * (3 * MIB))) for i in range(2)]
        answer = httpx.post(f"{api.url}/predict", files=files, timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert "4 MiB of request bodies" in answer.json()["message"]
        small = httpx.post(f"{api.url}/predict", files=files[:1], timeout=30)
        assert small.status_code == 400, small.text  # within the budget: read, then refused as no image


def test_big_bodies_leave_a_quarter_of_the_budget_to_small_ones() -> None:
    """The soak at c=32 saw ordinary one-image /invocations answer 503 while 57 MiB bodies filled the budget."""
    from services.api.errors import Overloaded
    from services.api.uploads import BodyBudget

    budget = BodyBudget(100, small_bytes=10)
    budget.take(10)
    budget.take(60, already=10)  # a big body: 70 held of the 75 big bodies may fill
    with pytest.raises(Overloaded):
        budget.take(10, already=70)
    budget.take(10)  # small bodies still fit, up to the whole budget
    budget.take(10)
    budget.take(10)
    with pytest.raises(Overloaded):
        budget.take(1)  # past the whole budget, even for a small one


# ---------------------------------------------------------------- MEDIUM 2: /invocations off the fast path


def reset_peak(pid: int) -> float:
    """Start VmHWM afresh (``clear_refs`` 5) and return the RSS it starts from, MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_mib(pid, "VmRSS")


def json_images(n: int, value: bytes) -> bytes:
    pixel = b"[" + b",".join([value] * 3) + b"]"
    row = b"[" + b",".join([pixel] * 224) + b"]"
    image = b"[" + b",".join([row] * 224) + b"]"
    return b'{"inputs":[' + b",".join([image] * n) + b"]}"


def invoke(api: Api, body: bytes) -> httpx.Response:
    return httpx.post(f"{api.url}/invocations", content=body, headers={"content-type": "application/json"}, timeout=120)


def test_57_mib_of_strings_is_refused_without_growing_the_process(fake_api: Api) -> None:
    """Four clients at once send 57 MiB of ``"0.5"`` strings shaped as 62 images: each gets 400 saying the
    values must be numbers (or 503 when big bodies fill their share of API_BODY_BUFFER_BYTES), and the process
    grows by a fraction of what orjson built (465 -> 2,607 MiB): the bodies the budget admits and one parse."""
    body = json_images(62, b'"0.5"')
    assert 56 * MIB < len(body) < 64 * MIB
    start = reset_peak(fake_api.pid)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: invoke(fake_api, body), range(4)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses in ([400] * 4, [400] * 3 + [503]), statuses  # a fourth may find the body budget full
    assert all("numbers only" in a.json()["message"] for a in answers if a.status_code == 400)
    grown = status_mib(fake_api.pid, "VmHWM") - start
    print(f"four 57 MiB bodies at once: +{grown:.0f} MiB")
    assert grown < 900, f"four 57 MiB bodies grew the process by {grown:.0f} MiB"


def test_65_images_are_refused_by_count_before_any_value_is_built(fake_api: Api) -> None:
    """65 valid images (45 MiB) answer 413 from the count alone: the process grows by about the body's copies
    and simdjson's document, not by the +890 MiB of 9.8 million Python floats."""
    body = json_images(65, b"0.5")
    start = reset_peak(fake_api.pid)
    answer = invoke(fake_api, body)
    assert answer.status_code == 413, answer.text
    assert "at most 64 images per request; received 65" in answer.json()["message"]
    grown = status_mib(fake_api.pid, "VmHWM") - start
    print(f"65 images: +{grown:.0f} MiB")
    assert grown < 3 * len(body) / MIB, f"a {len(body) / MIB:.0f} MiB body grew the process by {grown:.0f} MiB"


def test_a_five_million_key_record_is_refused_by_its_width(fake_api: Api) -> None:
    """One ``dataframe_records`` record with 5M keys: 400 (a row is one image, 150,528 values) from the record's
    key count on simdjson's document (~6x the body), before any key becomes a Python string (8 s and +718 MiB)."""
    body = b'{"dataframe_records":[{' + b",".join(b'"k%d":0' % i for i in range(5_000_000)) + b"}]}"
    start = reset_peak(fake_api.pid)
    answer = invoke(fake_api, body)
    assert answer.status_code == 400, answer.text
    assert "(1, 5000000)" in answer.json()["message"]
    grown = status_mib(fake_api.pid, "VmHWM") - start
    print(f"5M-key record: +{grown:.0f} MiB")
    assert grown < 500, f"a {len(body) / MIB:.0f} MiB body grew the process by {grown:.0f} MiB (simdjson's document)"


def test_every_mlflow_format_still_answers(fake_api: Api) -> None:
    """The seed clients' ``{"inputs": [224x224x3 floats]}`` (fast path) and MLflow's other formats, large
    enough to take the screened path, give the same predictions."""
    import numpy as np
    import orjson

    image = np.random.default_rng(5).random((224, 224, 3))
    flat = image.reshape(-1).tolist()
    columns = [f"c{i}" for i in range(flat.__len__())]
    bodies = {
        "inputs": {"inputs": [image.tolist()]},
        "instances": {"instances": [image.tolist()]},
        "params first": {"params": {"a": 1}, "inputs": [image.tolist()]},
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": [flat]}},
        "dataframe_records": {"dataframe_records": [dict(zip(columns, flat, strict=True))]},
    }
    answers = {name: invoke(fake_api, orjson.dumps(body)) for name, body in bodies.items()}
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(bodies, 200)
    predictions = {name: a.json()["predictions"] for name, a in answers.items()}
    for name, got in predictions.items():
        np.testing.assert_allclose(got, predictions["inputs"], atol=1e-6, err_msg=name)
