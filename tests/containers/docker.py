"""The container tests' view of the engine: the images the images check built, and containers that are
always on the host's network, labelled with this run, and removed by id afterwards; and what the tests ask
of the services in them (a photo of each class, the registry's champion).

The machine's rules for containers: every container uses the host's network (there is no bridge), and test
traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
PHOTOS = {"dandelion": "dandelion/00000000.jpg", "grass": "grass/00000000.jpg"}
"""A real photo of each class, under the data folder."""
MANIFEST = REPO / "var" / "ci" / "images.json"
LABEL = "dandelion-grass.test"


class Docker:
    """A thin client over the ``docker`` command; every container it starts is removed by :meth:`cleanup`."""

    def __init__(self, binary: str, run_id: str | None = None) -> None:
        self.binary = binary
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.started: list[str] = []

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def run(self, image: str, *command: str, options: Sequence[str] = (), env: dict[str, str] | None = None) -> str:
        """Start ``image`` detached on the host's network; its id."""
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        done = self(
            "run", "-d", "--network", "host", "--label", f"{LABEL}={self.run_id}", *env_args, *options, image, *command
        )
        container = done.stdout.strip()
        self.started.append(container)
        return container

    def wait(self, container: str, timeout: float) -> int:
        """The container's exit code, once it has exited."""
        return int(self("wait", container, timeout=timeout).stdout.strip())

    def logs(self, container: str) -> str:
        done = self("logs", container, check=False)
        return done.stdout + done.stderr

    def state(self, container: str) -> dict:
        return json.loads(self("inspect", "-f", "{{json .State}}", container).stdout)

    def remove(self, container: str) -> None:
        """Remove one container, by id (killed if it still runs)."""
        self("rm", "-f", "-v", container, check=False)
        if container in self.started:
            self.started.remove(container)

    def cleanup(self) -> None:
        """Remove what this run started, by id (and anything else that carries this run's label)."""
        labelled = self("ps", "-aq", "--filter", f"label={LABEL}={self.run_id}", check=False).stdout.split()
        ids = list(dict.fromkeys([*self.started, *labelled]))
        if ids:
            self("rm", "-f", "-v", *ids, check=False)
        self.started.clear()


@dataclass
class Images:
    """What ``.ci/images`` wrote: the engine's client and the tags of the images it built."""

    docker: str
    tags: dict[str, str] = field(default_factory=dict)

    revision: str = "unknown"

    @classmethod
    def from_manifest(cls, path: Path = MANIFEST) -> Images | None:
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        return cls(docker=manifest["docker"], tags=manifest["images"], revision=manifest.get("revision", "unknown"))


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    """Poll ``check`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except AssertionError:  # a verdict (say, the container exited), not a reason to wait longer
            raise
        except Exception as exc:  # the last one is reported when time runs out
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s (last error: {last!r})")


def classify(port: int, data_dir: Path) -> dict[str, dict]:
    """The API on 127.0.0.1:``port``'s answers to :data:`PHOTOS`, by their true label."""
    answers = {}
    for label, photo in PHOTOS.items():
        path = data_dir / photo
        response = httpx.post(
            f"http://127.0.0.1:{port}/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=30
        )
        assert response.status_code == 200, response.text
        answers[label] = response.json()
    return answers


def champion_version(tracking_uri: str, model: str) -> str:
    """The version behind ``model@champion`` on the tracking server, read as the API reads it."""
    from services.api.registry import RestRegistry
    from shared.settings import RegistrySettings

    version, _ = RestRegistry(RegistrySettings(tracking_uri=tracking_uri, model_name=model)).resolve()
    return version
