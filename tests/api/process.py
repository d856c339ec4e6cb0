"""Run the real API on a free port: as a process (``python -m services.api``), or, with a fake model, on a real
uvicorn server in a thread of the test process (the fake cannot cross a process)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from tests.servers import free_port, running, wait_until


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


@contextmanager
def app_in_thread(app) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 in a thread, until it is ready; stopped (lifespan and all) after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200, None, 30, None, "the app")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
