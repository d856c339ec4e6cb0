"""compose.yaml as this machine can run it, derived from the file itself (not a second stack).

Every service on the host's network (there is no bridge; test traffic goes to 127.0.0.1 only), so service
names become 127.0.0.1 and each server gets a free port of its own; the third-party images that cannot be
pulled here are replaced by the stand-ins the images check built (``standins/``: MariaDB for MySQL, moto's
server for Minio, Debian's Prometheus); Grafana cannot be had, and its provisioning stays validated
statically (tests/deploy). What the stand-ins cannot do is left out and said here: minio-init's application
user and its policy (moto accepts any credentials). Everything else (the product's images, commands,
healthchecks, start order, volumes, limits, security options) is compose.yaml's own.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tests.containers.docker import REPO, Images

COMPOSE_FILE = REPO / "compose.yaml"


@dataclass(frozen=True)
class Ports:
    mysql: int
    s3: int
    mlflow: int
    api: int
    api_2: int
    prometheus: int

    @classmethod
    def free(cls) -> Ports:
        """Six distinct free ports: every socket stays bound until all are chosen."""
        with ExitStack() as stack:
            sockets = [stack.enter_context(socket.socket()) for _ in range(6)]
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            return cls(*(sock.getsockname()[1] for sock in sockets))


def _replace(value, old: str, new: str):
    """``value`` with ``old`` replaced by ``new`` in every string inside it."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: _replace(item, old, new) for key, item in value.items()}
    return value


def _absolute(volume: str) -> str:
    """A bind mount relative to the compose file, made absolute (the derived file lives elsewhere)."""
    source, _, rest = volume.partition(":")
    return f"{(REPO / source).resolve()}:{rest}" if source.startswith("./") else volume


def for_this_machine(compose: dict, ports: Ports, images: Images, data_dir: Path, work: Path) -> dict:
    """compose.yaml as this machine can run it: host networking, stand-ins, free ports (see the module)."""
    stack = copy.deepcopy(compose)
    services: dict[str, dict] = stack["services"]
    del services["grafana"]
    stack["volumes"].pop("grafana-data", None)
    for old, new in {
        "@mysql:3306/": f"@127.0.0.1:{ports.mysql}/",
        "http://minio:9000": f"http://127.0.0.1:{ports.s3}",
        "http://mlflow:5000": f"http://127.0.0.1:{ports.mlflow}",
    }.items():
        services = _replace(services, old, new)
    for service in services.values():
        service["network_mode"] = "host"
        service.pop("ports", None)
        service.pop("networks", None)
        service["volumes"] = [_absolute(v) if isinstance(v, str) else v for v in service.get("volumes", [])]
        service.pop("build", None)  # the images check built them (IMAGE_TAG=ci)

    mysql = services["mysql"]
    mysql["image"] = images.tags["standin-mariadb"]
    mysql["command"] = [*mysql["command"], f"--port={ports.mysql}", "--bind-address=127.0.0.1"]

    minio = services["minio"]
    minio["image"] = images.tags["standin-s3"]
    minio["command"] = ["-H", "127.0.0.1", "-p", str(ports.s3)]
    minio["healthcheck"]["test"] = ["CMD", "python", "-c", _http_check(ports.s3, "/moto-api/")]
    minio["volumes"] = []
    init = services["minio-init"]
    buckets = re.findall(r"local/([\w.-]+)", re.search(r"mc mb [^\n]*", init["command"][0]).group(0))
    init["image"] = images.tags["standin-s3"]
    init["entrypoint"] = ["make-buckets"]
    init["command"] = [f"http://127.0.0.1:{ports.s3}", *buckets]
    init["environment"] = {
        "AWS_ACCESS_KEY_ID": init["environment"]["APP_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": init["environment"]["APP_SECRET_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    mlflow = services["mlflow"]
    mlflow["command"] = _replace(_replace(mlflow["command"], "5000", str(ports.mlflow)), "0.0.0.0", "127.0.0.1")
    mlflow["healthcheck"] = _replace(mlflow["healthcheck"], ":5000/", f":{ports.mlflow}/")

    trainer = services["trainer"]
    trainer["environment"]["DATA_SOURCE"] = "/data"
    trainer["volumes"].append(f"{data_dir}:/data:ro")

    for name, port in (("api", ports.api), ("api-2", ports.api_2)):
        services[name]["environment"].update(API_HOST="127.0.0.1", API_PORT=str(port))

    prometheus = services["prometheus"]
    config = work / "prometheus"
    shutil.copytree(REPO / "monitoring" / "prometheus", config)
    scrape = (config / "prometheus.yml").read_text()
    for old, new in {
        '"api:8000"': f'"127.0.0.1:{ports.api}"',
        '"api-2:8000"': f'"127.0.0.1:{ports.api_2}"',
        '"localhost:9090"': f'"127.0.0.1:{ports.prometheus}"',
    }.items():
        assert old in scrape, old
        scrape = scrape.replace(old, new)
    (config / "prometheus.yml").write_text(scrape)
    prometheus["image"] = images.tags["standin-prometheus"]
    prometheus["command"] = [*prometheus["command"], f"--web.listen-address=127.0.0.1:{ports.prometheus}"]
    prometheus["volumes"] = [
        f"{config}:/etc/prometheus:ro" if v.endswith(":/etc/prometheus:ro") else v for v in prometheus["volumes"]
    ]
    prometheus["healthcheck"] = _replace(prometheus["healthcheck"], ":9090/", f":{ports.prometheus}/")

    stack["services"] = services
    return stack


def _http_check(port: int, path: str) -> str:
    return f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4)"
