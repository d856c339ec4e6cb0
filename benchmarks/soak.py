"""Soak test: mixed traffic against the API for a while, watching errors, latency and the process's memory.

Starts ``python -m services.api`` on 127.0.0.1 (model from the usual environment: ``MLFLOW_TRACKING_URI``,
``MODEL_NAME``, ...) or uses ``--url``; runs ``--concurrency`` workers for ``--seconds`` over
``/predict`` (real photos), ``/invocations`` (seed-style JSON), ``/model``, ``/health/ready`` and one
deliberate bad request (must answer 400), and with ``--hostile`` the hostile probe's requests too (each must get
its 4xx: request-sized JSON skeletons, a million zeros, random paths, an oversized feedback body, too many
headers, a 6300 x 6300 16-bit PNG, a float TIFF, an EPS, 57 MiB of JSON strings, 16 idle sockets), after
``--warm`` s of ordinary traffic and followed by ``--idle`` s of none (10 and 30 s with ``--hostile``: the report's
warm and idle RSS say whether memory comes back); samples the API's RSS every second from ``/proc``; prints errors
(5xx, transport errors, any unexpected status), p50/p95/p99 per endpoint, and RSS: start, peak, and growth
after a warm-up (``--warmup``, 30 s; RSS levels off within it at concurrency 32) measured robustly: the
median RSS of the first and of the last 30 s of the steady part, and a least-squares trend in MiB per minute,
because a single sample swings by +-15 % with the number of request bodies in flight.
Exits 1 on any error.

    python -m benchmarks.soak --seconds 120 --concurrency 32
    python -m benchmarks.soak --url http://127.0.0.1:8000 --pid 12345 --seconds 60
    python -m benchmarks.soak --hostile --seconds 120    # normal traffic mixed with the probe's requests

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DANDELION_DATA_DIR", REPO.parent / "shared" / "data" / "dandelion-grass"))
MIX = {"predict": 4, "invocations": 2, "model": 2, "ready": 1, "bad-request": 1}
"""Relative weight of each kind of request."""
EXPECTED = {"predict": 200, "invocations": 200, "model": 200, "ready": 200, "bad-request": 400}
HOSTILE = {
    "skeleton": 1,
    "zeros": 1,
    "random-path": 1,
    "big-feedback": 1,
    "many-headers": 1,
    "png16": 1,
    "float-tiff": 1,
    "eps": 1,
    "json-57mib": 1,
}
"""With ``--hostile``: the hostile probes' requests (services/api hardening), each as often as a bad request; and
16 idle sockets at a time, opened again as soon as the server has closed the last ones."""
HOSTILE_EXPECTED: dict[str, tuple[int, ...]] = {
    "skeleton": (400,),
    "zeros": (400,),
    "random-path": (404,),
    "big-feedback": (413,),
    "many-headers": (431,),
    "png16": (200, 413),  # a 6300 x 6300 16-bit PNG (75 KB): decoded within the byte budget, or refused by it
    "float-tiff": (200, 413),
    "eps": (415,),  # never handed to Ghostscript
    "json-57mib": (400, 503),  # 57 MiB of "0.5" strings; 503 when the bodies in progress fill the body budget
}
IDLE_SOCKETS = 16
IDLE_SOCKET_DEADLINE_S = 30.0
"""An idle socket the server has not closed after this is an error (its header deadline is 10 s by default)."""
UPLOADS = {"png16", "float-tiff", "eps"}


def hostile_bodies() -> dict[str, list[bytes]]:
    import io

    from PIL import Image

    def saved(image: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    skeletons = [b'{"inputs":[' + b",".join([b"0"] * n) + b"]" + b" " * 70_000 + b"}" for n in range(200, 208)]
    pixel = b'["0.5","0.5","0.5"]'
    image = b"[" + b",".join([b"[" + b",".join([pixel] * 224) + b"]"] * 224) + b"]"
    return {
        "skeleton": skeletons,
        "zeros": [b'{"inputs":[' + b",".join([b"0"] * 1_000_000) + b"]}"],
        "json-57mib": [b'{"inputs":[' + b",".join([image] * 62) + b"]}"],
        "png16": [saved(Image.new("I;16", (6300, 6300)), "PNG", optimize=True)],
        "float-tiff": [
            saved(Image.fromarray(np.zeros((6300, 6300), np.float32), "F"), "TIFF", compression="tiff_adobe_deflate")
        ],
        "eps": [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n{ } loop\n"],
    }


def expected_statuses(kind: str) -> tuple[int, ...]:
    return HOSTILE_EXPECTED[kind] if kind in HOSTILE_EXPECTED else (EXPECTED[kind],)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` plus its direct children (uvicorn workers), in KiB."""
    total, found = 0, False
    pids = [pid]
    with suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    found = True
    return total if found else None


@contextmanager
def start_api(log: Path, timeout: float) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited with {process.returncode}; see {log}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API was not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.3)
        yield url, process.pid
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {kind: [] for kind in {**MIX, **HOSTILE, "idle-sockets": 0}}
    )
    errors: Counter[str] = field(default_factory=Counter)
    rss_kib: list[int] = field(default_factory=list)
    rss_at: list[float] = field(default_factory=list)
    """Seconds since the load started, one per ``rss_kib`` sample."""
    seconds: float = 0.0
    warmup_s: float = 30.0
    warm_rss_kib: float | None = None
    """RSS after the warm phase of ordinary traffic (``--warm``), before the measured load."""
    idle_rss_kib: float | None = None
    """RSS at the end of the idle phase (``--idle``) after the load."""
    idle_s: float = 0.0

    def rss_report(self, window_s: float = 30.0) -> dict:
        rss = np.array(self.rss_kib, dtype=np.float64) / 1024
        at = np.array(self.rss_at, dtype=np.float64)
        report: dict = {
            "start": round(float(rss[0]), 1) if len(rss) else None,
            "end": round(float(rss[-1]), 1) if len(rss) else None,
            "peak": round(float(rss.max()), 1) if len(rss) else None,
            "warmup_s": self.warmup_s,
            "samples": [[round(float(t), 1), round(float(r), 1)] for t, r in zip(at, rss, strict=True)],
        }
        if self.warm_rss_kib is not None:
            report["warm"] = round(self.warm_rss_kib / 1024, 1)
        if self.idle_rss_kib is not None:
            report.update(idle=round(self.idle_rss_kib / 1024, 1), idle_s=self.idle_s)
        steady = at >= self.warmup_s
        if steady.sum() >= 4 and at[steady][-1] - at[steady][0] >= 2 * window_s:
            t, r = at[steady], rss[steady]
            first = float(np.median(r[t <= t[0] + window_s]))
            last = float(np.median(r[t >= t[-1] - window_s]))
            slope = float(np.polyfit(t / 60, r, 1)[0])
            report.update(
                steady_first_median=round(first, 1),
                steady_last_median=round(last, 1),
                growth_percent=round(100 * (last - first) / first, 1),
                trend_mib_per_min=round(slope, 2),
            )
        return report

    def report(self) -> dict:
        total = sum(len(v) for v in self.latencies.values())
        endpoints = {}
        for kind, values in self.latencies.items():
            if not values and kind not in MIX:
                continue
            ms = np.array(values) * 1000 if values else np.array([np.nan])
            endpoints[kind] = {
                "requests": len(values),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p95_ms": round(float(np.percentile(ms, 95)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1),
            }
        return {
            "seconds": round(self.seconds, 1),
            "requests": total,
            "requests_per_s": round(total / self.seconds, 1) if self.seconds else 0,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "endpoints": endpoints,
            "rss_mib": self.rss_report(),
        }


def photos(folder: Path, limit: int = 40) -> list[tuple[str, bytes]]:
    files = sorted(folder.glob("*/*.jpg"))[:: max(1, len(list(folder.glob("*/*.jpg"))) // limit)][:limit]
    if not files:
        raise SystemExit(f"no photos under {folder}/*/*.jpg; pass --data")
    return [(f.name, f.read_bytes()) for f in files]


def seed_bodies() -> list[bytes]:
    rng = np.random.default_rng(0)
    images = (rng.random((1, 224, 224, 3), dtype=np.float32).round(4) for _ in range(4))
    return [orjson.dumps({"inputs": image.tolist()}) for image in images]


async def soak(
    url: str,
    pid: int | None,
    seconds: float,
    concurrency: int,
    data: Path,
    warmup_s: float = 30.0,
    hostile: bool = False,
    warm_s: float = 0.0,
    idle_s: float = 0.0,
) -> Results:
    """``warm_s`` of ordinary traffic (its RSS is the warm level), ``seconds`` of the mix, then ``idle_s`` of
    nothing (its last RSS is the idle level)."""
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("the soak test only talks to 127.0.0.1")
    images, bodies = photos(data), seed_bodies()
    probes = hostile_bodies() if hostile else {}
    mix = {**MIX, **HOSTILE} if hostile else MIX
    kinds = [kind for kind, weight in mix.items() for _ in range(weight)]
    ordinary = [kind for kind, weight in MIX.items() for _ in range(weight)]
    results = Results(warmup_s=warmup_s, idle_s=idle_s)

    async def one(client: httpx.AsyncClient, kind: str, n: int) -> httpx.Response:
        if kind == "predict":
            name, jpeg = images[n % len(images)]
            return await client.post("/predict", files={"file": (name, jpeg, "image/jpeg")})
        if kind == "invocations":
            body = bodies[n % len(bodies)]
            return await client.post("/invocations", content=body, headers={"content-type": "application/json"})
        if kind == "model":
            return await client.get("/model")
        if kind == "ready":
            return await client.get("/health/ready")
        if kind in UPLOADS:
            return await client.post("/predict", files={"file": (kind, probes[kind][0])})
        if kind in probes:
            body = probes[kind][n % len(probes[kind])]
            return await client.post("/invocations", content=body, headers={"content-type": "application/json"})
        if kind == "random-path":
            return await client.get(f"/static/x{n}-{random.getrandbits(32):08x}/")
        if kind == "big-feedback":
            body = b'{"prediction_id":"' + b"0" * 32 + b'","label":"grass","x":"' + b"a" * 8000 + b'"}'
            return await client.post("/feedback", content=body, headers={"content-type": "application/json"})
        if kind == "many-headers":
            return await client.get("/health/live", headers={f"x-probe-{i}": "1" for i in range(150)})
        return await client.post("/predict", files={"file": ("notes.jpg", b"not an image", "image/jpeg")})

    async def worker(client: httpx.AsyncClient, index: int, kinds: list[str], stop_at: float) -> None:
        rng = random.Random(index)
        for n in itertools.count(index * 7919):
            if time.monotonic() >= stop_at:
                return
            kind = rng.choice(kinds)
            started = time.perf_counter()
            try:
                response = await one(client, kind, n)
            except httpx.HTTPError as exc:
                results.errors[f"{kind}: {type(exc).__name__}"] += 1
                continue
            results.latencies[kind].append(time.perf_counter() - started)
            if response.status_code not in expected_statuses(kind):
                results.errors[f"{kind}: HTTP {response.status_code}"] += 1

    async def idle_sockets(stop_at: float) -> None:
        """16 sockets that send nothing, opened again once the server has closed them all."""
        address = urlsplit(url)
        while time.monotonic() < stop_at:
            opened = time.perf_counter()
            connections = [await asyncio.open_connection(address.hostname, address.port) for _ in range(IDLE_SOCKETS)]
            for reader, writer in connections:
                try:
                    await asyncio.wait_for(
                        reader.read(100), max(0.1, IDLE_SOCKET_DEADLINE_S - (time.perf_counter() - opened))
                    )
                except TimeoutError:
                    results.errors["idle-sockets: still open"] += 1
                except OSError:
                    pass
                writer.close()
            results.latencies["idle-sockets"].append(time.perf_counter() - opened)

    def sample() -> None:
        if pid is not None and (value := rss_kib(pid)) is not None:
            results.rss_kib.append(value)
            results.rss_at.append(time.monotonic() - started)

    async def sample_rss() -> None:
        while pid is not None:
            sample()
            await asyncio.sleep(1)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.monotonic()
        sampler = asyncio.create_task(sample_rss())
        if warm_s:
            warm_until = time.monotonic() + warm_s
            await asyncio.gather(*(worker(client, i, ordinary, warm_until) for i in range(concurrency)))
            sample()
            results.warm_rss_kib = float(np.median(results.rss_kib[-3:])) if results.rss_kib else None
        load_started = time.monotonic()
        stop_at = load_started + seconds
        tasks = [worker(client, i, kinds, stop_at) for i in range(concurrency)]
        if hostile:
            tasks.append(idle_sockets(stop_at))
        await asyncio.gather(*tasks)
        results.seconds = time.monotonic() - load_started
        if idle_s:
            await asyncio.sleep(idle_s)
        sampler.cancel()
        with suppress(asyncio.CancelledError):
            await sampler
        sample()
        if idle_s and results.rss_kib:
            results.idle_rss_kib = float(results.rss_kib[-1])
    return results


def print_report(report: dict, concurrency: int) -> None:
    print(
        f"soak: {report['seconds']} s at concurrency {concurrency}: {report['requests']} requests "
        f"({report['requests_per_s']}/s), {report['errors']} errors"
    )
    for kind, count in report["error_kinds"].items():
        print(f"  error  {kind}: {count}")
    print(f"  {'endpoint':<12} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for kind, e in report["endpoints"].items():
        print(f"  {kind:<12} {e['requests']:>8} {e['p50_ms']:>8} {e['p95_ms']:>8} {e['p99_ms']:>8}")
    rss = report["rss_mib"]
    if rss["start"] is not None:
        print(f"  RSS MiB: start {rss['start']}, end {rss['end']}, peak {rss['peak']}")
    if "warm" in rss or "idle" in rss:
        print(
            f"  RSS MiB: warm {rss.get('warm')} (after --warm), "
            f"idle {rss.get('idle')} ({rss.get('idle_s', 0):g} s after the load)"
        )
    if "growth_percent" in rss:
        print(
            f"  RSS after {rss['warmup_s']:g} s warm-up: median {rss['steady_first_median']} MiB (first 30 s) -> "
            f"{rss['steady_last_median']} MiB (last 30 s), growth {rss['growth_percent']}%, "
            f"trend {rss['trend_mib_per_min']:+} MiB/min"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an API already running on 127.0.0.1 (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the API's process id, to sample its RSS")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=30, help="seconds of load before RSS growth is measured")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="photos in dandelion/ and grass/")
    parser.add_argument("--log", type=Path, default=REPO / "var" / "soak-api.log", help="the started API's log")
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--hostile", action="store_true", help="mix the hostile probe's requests into the traffic")
    parser.add_argument(
        "--warm", type=float, help="seconds of ordinary traffic first, for the warm RSS (default: 10 with --hostile)"
    )
    parser.add_argument(
        "--idle", type=float, help="seconds idle after the load, for the idle RSS (default: 30 with --hostile)"
    )
    args = parser.parse_args(argv)
    warm_s = args.warm if args.warm is not None else (10.0 if args.hostile else 0.0)
    idle_s = args.idle if args.idle is not None else (30.0 if args.hostile else 0.0)

    def run(url: str, pid: int | None) -> Results:
        return asyncio.run(
            soak(url, pid, args.seconds, args.concurrency, args.data, args.warmup, args.hostile, warm_s, idle_s)
        )

    if args.url:
        results = run(args.url, args.pid)
    else:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with start_api(args.log, args.ready_timeout) as (url, pid):
            results = run(url, pid)
    report = results.report()
    print_report(report, args.concurrency)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
