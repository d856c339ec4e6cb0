"""Run the real API (``python -m services.api``) as a process on a free port."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.servers import free_port, running


@contextmanager
def api_process(env: dict[str, str], log: Path, *, wait_ready: bool = True, timeout: float = 120) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    check = f"{url}/health/ready" if wait_ready else f"{url}/health/live"
    with running(
        [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)],
        ready=lambda: httpx.get(check, timeout=2).status_code == 200,
        log=log,
        env=env,
        timeout=timeout,
        what="the API",
    ):
        yield url
