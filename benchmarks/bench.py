"""Side-by-side benchmark: our API against ``mlflow models serve`` on the same registered model.

One run starts both servers on one model version, sends them identical request streams at each
concurrency (seed-style JSON ``{"inputs": [224x224x3 floats]}`` to ``/invocations``; the same photos as
JPEG uploads to our ``/predict``, with batching on and off), and prints latency percentiles, throughput,
errors, peak RSS and seconds from start to ready, the ratios ours/MLflow's, and the floor: decode + one
raw forward pass, measured in this process.

    python -m benchmarks.bench                    # trains a quick model into a private registry first
    python -m benchmarks.bench --tracking-uri http://127.0.0.1:5000 --model-name dandelion-grass
    python -m benchmarks.bench --quick            # a few requests per cell: checks that it all still works

Only 127.0.0.1 is ever contacted (and the given tracking server). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEFAULT_DATA = Path(os.environ.get("DANDELION_DATA_DIR", REPO.parent / "shared" / "data" / "dandelion-grass"))
BOUNDARY = "benchmark-boundary-7d1f3c"


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def _status_kb(pid: int, key: str) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Memory:
    serving_rss_mb: float
    """RSS of the process that holds the model (the largest in the tree), right after ready."""
    serving_peak_mb: float
    """Its high-water mark (VmHWM) at the end of the load."""
    tree_rss_mb: float
    """All processes of the server together, right after ready."""


class Server:
    """A server process: started in its own session, timed to ready, measured, stopped with its tree."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], ready_path: str, log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = env
        self.ready_path = ready_path
        self.log = log
        self.process: subprocess.Popen | None = None
        self.ready_s = float("nan")
        self.serving_pid = 0
        self.memory = Memory(0, 0, 0)

    def start(self, timeout: float = 240) -> Server:
        with self.log.open("ab") as out:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=_env(self.env), cwd=REPO, start_new_session=True
            )
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self._tail()}")
            with suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self._tail()}")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - started
        tree = _children(self.process.pid)
        rss = {pid: _status_kb(pid, "VmRSS") for pid in tree}
        self.serving_pid = max(rss, key=rss.get)
        self.memory = Memory(rss[self.serving_pid] / 1024, 0, sum(rss.values()) / 1024)
        return self

    def finish_memory(self) -> None:
        self.memory.serving_peak_mb = _status_kb(self.serving_pid, "VmHWM") / 1024

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server.start()
    finally:
        server.stop()


# ---------------------------------------------------------------- the registered model


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    model_name: str
    model_alias: str = "champion"


@contextmanager
def private_registry(work: Path, data: Path, per_class: int) -> Iterator[Registry]:
    """An ``mlflow server`` (SQLite, local artifacts) holding a champion trained by the trainer's own recipe on
    ``per_class`` photos of each class: the serving path is the production one (ingest -> features -> train ->
    register -> export), and so is the network that serves."""
    server = Server(
        "mlflow server",
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{work}/mlflow.db",
            "--artifacts-destination",
            str(work / "mlartifacts"),
        ],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        "/health",
        work / "mlflow-server.log",
    )
    with running(server):
        registry = Registry(server.url, "dandelion-grass-bench")
        env = {
            "MLFLOW_TRACKING_URI": registry.tracking_uri,
            "MODEL_NAME": registry.model_name,
            "DATABASE_URL": f"sqlite+aiosqlite:///{work}/dandelion.db",
            "OBJECT_STORE_URL": str(work / "objects"),
            "TRAINER_PROMOTION_FLOOR": "0",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        argv = [sys.executable, "-m", "services.trainer", "run", "--quiet", "--force"]
        argv += ["--source", str(data), "--per-class", str(per_class)]
        print(f"training a model into a private registry ({server.url}) ...", flush=True)
        with (work / "trainer.log").open("ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=REPO, check=False)
        if done.returncode:
            raise RuntimeError(f"training failed:\n{(work / 'trainer.log').read_text(errors='replace')[-3000:]}")
        yield registry


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Stream:
    """The same requests, in the same order, for every server."""

    photos: list[Path]
    jpegs: list[bytes]
    images: np.ndarray
    json_bodies: list[bytes]
    multipart_bodies: list[bytes]


def make_stream(data: Path, n: int, seed: int = 7) -> Stream:
    from shared.images import preprocess

    rng = random.Random(seed)
    photos = rng.sample(sorted((data / "dandelion").glob("*.jpg")), n // 2)
    photos += rng.sample(sorted((data / "grass").glob("*.jpg")), n - n // 2)
    rng.shuffle(photos)
    jpegs = [p.read_bytes() for p in photos]
    images = np.stack([preprocess(j) for j in jpegs])
    json_bodies = [orjson.dumps({"inputs": x[np.newaxis]}, option=orjson.OPT_SERIALIZE_NUMPY) for x in images]
    multipart = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + j
        + f"\r\n--{BOUNDARY}--\r\n".encode()
        for p, j in zip(photos, jpegs, strict=True)
    ]
    return Stream(photos, jpegs, images, json_bodies, multipart)


@dataclass
class Cell:
    server: str
    endpoint: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {
            "server": self.server,
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "throughput_rps": self.throughput,
            "seconds": self.seconds,
            "error_samples": self.error_samples[:3],
        }


EXPLAIN = "/predict?explain=true"
"""``/predict`` asked for the class activation map as well."""


def _request(endpoint: str, stream: Stream) -> tuple[list[bytes], str]:
    if endpoint == "/invocations":
        return stream.json_bodies, "application/json"
    return stream.multipart_bodies, f"multipart/form-data; boundary={BOUNDARY}"


async def load(
    url: str, server: str, endpoint: str, stream: Stream, concurrency: int, max_requests: int, max_seconds: float
) -> Cell:
    """``concurrency`` clients in a closed loop until ``max_requests`` were sent or ``max_seconds`` passed."""
    bodies, content_type = _request(endpoint, stream)
    cell = Cell(server, endpoint, concurrency)
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(endpoint, content=body, headers={"content-type": content_type})
                    ok = response.status_code == 200
                    problem = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, problem = False, f"{type(exc).__name__}: {exc}"[:200]
                if ok:
                    cell.latencies_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    cell.errors += 1
                    cell.error_samples.append(problem)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.seconds = time.perf_counter() - started
    cell.requests = sent
    return cell


def predictions(url: str, stream: Stream, n: int) -> np.ndarray:
    with httpx.Client(base_url=url, timeout=120) as client:
        out = []
        for body in stream.json_bodies[:n]:
            response = client.post("/invocations", content=body, headers={"content-type": "application/json"})
            response.raise_for_status()
            out.append(response.json()["predictions"])
    return np.asarray(out, dtype=np.float64).reshape(n, -1)


def warm_up(url: str, endpoint: str, stream: Stream, n: int = 3) -> None:
    bodies, content_type = _request(endpoint, stream)
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in bodies[:n]:
            client.post(endpoint, content=body, headers={"content-type": content_type}).raise_for_status()


# ---------------------------------------------------------------- the floor


def floor_ms(registry: Registry, stream: Stream, repeats: int) -> tuple[float, float, float, str]:
    """Median ms of decode + one raw forward pass (batch 1) of the served artifact, in this process."""
    from services.api.registry import MlflowSource
    from shared.images import preprocess
    from shared.settings import RegistrySettings

    settings = RegistrySettings(
        tracking_uri=registry.tracking_uri, model_name=registry.model_name, model_alias=registry.model_alias
    )
    source = MlflowSource(settings)
    model = source.load(*source.resolve())
    decode, forward, both = [], [], []
    for i in range(repeats):
        jpeg = stream.jpegs[i % len(stream.jpegs)]
        t0 = time.perf_counter()
        x = preprocess(jpeg)
        t1 = time.perf_counter()
        model.forward(x[np.newaxis])
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        forward.append(t2 - t1)
        both.append(t2 - t0)
    ms = [statistics.median(v) * 1000 for v in (both, decode, forward)]
    return ms[0], ms[1], ms[2], model.runtime


# ---------------------------------------------------------------- the run


@dataclass
class Plan:
    concurrencies: tuple[int, ...]
    max_requests: int
    max_seconds: float
    mlflow_max_requests: int
    floor_repeats: int


FULL = Plan((1, 8, 32), max_requests=400, max_seconds=20, mlflow_max_requests=120, floor_repeats=200)
QUICK = Plan((1, 8), max_requests=8, max_seconds=20, mlflow_max_requests=8, floor_repeats=10)


def api_server(name: str, registry: Registry, work: Path, **settings: str) -> Server:
    env = {
        "MLFLOW_TRACKING_URI": registry.tracking_uri,
        "MODEL_NAME": registry.model_name,
        "MODEL_ALIAS": registry.model_alias,
        "API_POLL_INTERVAL_S": "3600",
        "API_LOG_LEVEL": "warning",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **settings,
    }
    argv = [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", "{port}"]
    return Server(name, argv, env, "/health/ready", work / f"{name.replace(' ', '-')}.log")


def mlflow_server(registry: Registry, work: Path) -> Server:
    argv = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{registry.model_name}@{registry.model_alias}"]
    argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}", "-w", "1"]
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return Server("mlflow serve", argv, env, "/ping", work / "mlflow-models-serve.log")


def run(registry: Registry, data: Path, work: Path, plan: Plan, log: Callable[[str], None]) -> dict:
    stream = make_stream(data, 16)
    cells: list[Cell] = []
    servers: dict[str, Server] = {}

    def measure(server: Server, endpoint: str, max_requests: int, up_to: int | None = None) -> None:
        warm_up(server.url, endpoint, stream)
        for c in (c for c in plan.concurrencies if up_to is None or c <= up_to):
            cell = asyncio.run(load(server.url, server.name, endpoint, stream, c, max_requests, plan.max_seconds))
            log(f"  {server.name} {endpoint} c={c}: {cell.throughput:.1f} req/s, p50 {cell.percentile(50):.1f} ms")
            cells.append(cell)

    log("mlflow models serve ...")
    with running(mlflow_server(registry, work)) as theirs:
        servers["mlflow serve"] = theirs
        reference = predictions(theirs.url, stream, 4)
        measure(theirs, "/invocations", plan.mlflow_max_requests)
        theirs.finish_memory()
    log("our API ...")
    with running(api_server("ours", registry, work)) as ours:
        servers["ours"] = ours
        difference = float(np.abs(predictions(ours.url, stream, 4) - reference).max())
        runtime = httpx.get(f"{ours.url}/model").json().get("runtime", "?")
        measure(ours, "/invocations", plan.max_requests)
        measure(ours, "/predict", plan.max_requests)
        measure(ours, EXPLAIN, plan.max_requests, up_to=8)  # the heat map's cost, at c=1 and c=8
        ours.finish_memory()
    log("our API with batching off ...")
    with running(api_server("ours no-batch", registry, work, API_MAX_BATCH_SIZE="1")) as unbatched:
        servers["ours no-batch"] = unbatched
        measure(unbatched, "/predict", plan.max_requests)
        unbatched.finish_memory()
    floor, decode, forward, floor_runtime = floor_ms(registry, stream, plan.floor_repeats)
    return {
        "machine": machine(),
        "plan": asdict(plan),
        "registry": asdict(registry),
        "runtime": runtime,
        "max_abs_difference_vs_mlflow": difference,
        "floor_ms": {"decode_and_forward": floor, "decode": decode, "forward": forward, "runtime": floor_runtime},
        "servers": {name: {"ready_s": s.ready_s, **asdict(s.memory)} for name, s in servers.items()},
        "cells": [c.summary() for c in cells],
    }


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- the report


def _cell(result: dict, server: str, endpoint: str, c: int) -> dict | None:
    return next(
        (x for x in result["cells"] if (x["server"], x["endpoint"], x["concurrency"]) == (server, endpoint, c)), None
    )


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float("nan")


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cpus']} CPUs, load average {', '.join(f'{v:.1f}' for v in m['load_average'])}",
        f"model: {result['registry']['model_name']}@{result['registry']['model_alias']}, our runtime "
        f"{result['runtime']}; /invocations max |ours - mlflow| = {result['max_abs_difference_vs_mlflow']:.2e}",
        "",
        "| server | endpoint | c | requests | errors | p50 ms | p95 ms | p99 ms | req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in result["cells"]:
        lines.append(
            f"| {x['server']} | {x['endpoint']} | {x['concurrency']} | {x['requests']} | {x['errors']} | "
            f"{x['p50_ms']:.1f} | {x['p95_ms']:.1f} | {x['p99_ms']:.1f} | {x['throughput_rps']:.1f} |"
        )
    lines += [
        "",
        "| server | ready after start s | serving RSS after load MB | serving peak RSS MB | process tree RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in result["servers"].items():
        lines.append(
            f"| {name} | {s['ready_s']:.2f} | {s['serving_rss_mb']:.0f} | {s['serving_peak_mb']:.0f} | "
            f"{s['tree_rss_mb']:.0f} |"
        )
    f = result["floor_ms"]
    lines += [
        "",
        f"floor (in-process, {f['runtime']}): decode + one forward pass {f['decode_and_forward']:.2f} ms "
        f"(decode {f['decode']:.2f} ms, forward {f['forward']:.2f} ms)",
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
    ]
    for c in result["plan"]["concurrencies"]:
        ours, theirs = _cell(result, "ours", "/invocations", c), _cell(result, "mlflow serve", "/invocations", c)
        target = ">= 25" if c == 8 else ""
        value = _ratio(ours and ours["throughput_rps"], theirs and theirs["throughput_rps"])
        lines.append(f"| /invocations throughput c={c}, ours / mlflow | {value:.1f} | {target} |")
        value = _ratio(ours and ours["p50_ms"], theirs and theirs["p50_ms"])
        lines.append(f"| /invocations p50 c={c}, ours / mlflow | {value:.3f} | |")
    for c in (c for c in result["plan"]["concurrencies"] if c <= 8):
        plain, explained = _cell(result, "ours", "/predict", c), _cell(result, "ours", EXPLAIN, c)
        value = _ratio(explained and explained["p50_ms"], plain and plain["p50_ms"])
        lines.append(f"| /predict p50 c={c}, with explain / without | {value:.2f} | |")
    predict1 = _cell(result, "ours", "/predict", 1)
    value = _ratio(predict1 and predict1["p50_ms"], f["decode_and_forward"])
    lines.append(f"| /predict p50 c=1 / floor | {value:.2f} | <= 1.5 |")
    top = max(result["plan"]["concurrencies"])
    batched, single = _cell(result, "ours", "/predict", top), _cell(result, "ours no-batch", "/predict", top)
    value = _ratio(batched and batched["throughput_rps"], single and single["throughput_rps"])
    lines.append(f"| /predict throughput c={top}, batching / API_MAX_BATCH_SIZE=1 | {value:.2f} | >= 1.5 |")
    servers = result["servers"]
    lines.append(f"| ours ready after start, s | {servers['ours']['ready_s']:.2f} | <= 6 |")
    value = _ratio(servers["ours"]["ready_s"], servers["mlflow serve"]["ready_s"])
    lines.append(f"| ready after start, ours / mlflow | {value:.2f} | |")
    value = _ratio(servers["ours"]["serving_rss_mb"], servers["mlflow serve"]["serving_rss_mb"])
    lines.append(f"| serving RSS after load, ours / mlflow | {value:.2f} | <= 0.8 |")
    value = _ratio(servers["ours"]["serving_peak_mb"], servers["mlflow serve"]["serving_peak_mb"])
    lines.append(f"| serving peak RSS, ours / mlflow | {value:.2f} | |")
    errors = sum(x["errors"] for x in result["cells"])
    lines += ["", f"errors: {errors}"]
    for x in result["cells"]:
        for sample in x["error_samples"]:
            lines.append(f"  {x['server']} {x['endpoint']} c={x['concurrency']}: {sample}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="an existing registry (default: a private one, trained here)")
    parser.add_argument("--model-name", default="dandelion-grass", help="with --tracking-uri")
    parser.add_argument("--model-alias", default="champion")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="photos in dandelion/ and grass/")
    parser.add_argument("--per-class", type=int, default=80, help="photos per class for the private model")
    parser.add_argument("--quick", action="store_true", help="a few requests per cell, concurrency 1 and 8")
    parser.add_argument("--concurrency", help="comma-separated, e.g. 1,8,32 (default: 1,8,32; quick: 1,8)")
    parser.add_argument("--requests", type=int, help="most requests per cell to our API")
    parser.add_argument("--mlflow-requests", type=int, help="most requests per cell to mlflow models serve")
    parser.add_argument("--seconds", type=float, help="most seconds per cell")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="keep logs (and the private registry) here")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    plan = Plan(
        tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else plan.concurrencies,
        args.requests or plan.max_requests,
        args.seconds or plan.max_seconds,
        args.mlflow_requests or plan.mlflow_max_requests,
        plan.floor_repeats,
    )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.tracking_uri:
            result = run(Registry(args.tracking_uri, args.model_name, args.model_alias), args.data, work, plan, log)
        else:
            with private_registry(work, args.data, args.per_class) as registry:
                result = run(registry, args.data, work, plan, log)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
