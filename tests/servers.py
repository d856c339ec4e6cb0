"""Start real servers for the tests: a process on a free port, polled until it answers, failing fast if it dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerDied(RuntimeError):
    pass


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen | None, timeout: float, log: Path | None, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise ServerDied(f"{what} exited with {process.returncode} before it was ready:\n{tail}")
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} was not ready after {timeout:.0f} s:\n{tail}")


def http_ok(url: str, status: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == status


@contextmanager
def running(
    argv: Sequence[str],
    *,
    ready: Callable[[], bool],
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
    what: str = "server",
    stop_signal: int = signal.SIGTERM,
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` until the block ends; its output goes to ``log`` (shown when it fails to start)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        wait_until(ready, process, timeout, log, what)
        yield process
    finally:
        stop(process, stop_signal)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; ``stop()`` makes the target look down, ``start()`` back up."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        thread.start()
        return self

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._server is not None:
            with suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread so the port is freed
            self._server.close()
            self._server = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass
            self._conns.clear()


class PrivateMariaDB:
    """A MariaDB server of the test's own (its own data directory and port) that can really be stopped and
    started again, unlike the machine's shared one, which the MLflow server and other tests use."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.datadir = root / "data"

    @property
    def url(self) -> str:
        return f"mysql+asyncmy://root@127.0.0.1:{self.port}/dg"

    def _answers(self) -> bool:
        import pymysql

        try:
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", connect_timeout=2)
        except pymysql.MySQLError:
            return False  # not listening yet
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS dg")
        conn.close()
        return True

    def start(self) -> PrivateMariaDB:
        if not self.datadir.exists():
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                check=True, capture_output=True,
            )  # fmt: skip
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.datadir}",
                 f"--port={self.port}",
                 f"--socket={self.root / 'mysqld.sock'}", "--bind-address=127.0.0.1", "--user=root",
                 "--skip-name-resolve", "--innodb-buffer-pool-size=32M", f"--pid-file={self.root / 'mysqld.pid'}"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(self._answers, self.process, 60, self.log, "private MariaDB")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGTERM, timeout=30)
            self.process = None
