"""``python -m benchmarks.scale``: the main job on N x the photos, as a user with more photos would run it.

For each factor N it makes a folder of N distinct variants of every photo of the sources (variant 0 is the photo
itself; the others are crops, flips, small rotations, colour jitter and re-encoding, each with its own hash), runs
the embedded main job on it in a temporary ``var/`` (``python -m services.trainer run --source <folder>``: SQLite,
a local object store, an embedded MLflow registry), then:

* measures the run: wall time, peak RSS of its process tree (sampled every 0.2 s), the backbone-embedding seconds
  and the figures it logged (cross-validated accuracy, photos flagged, out-of-domain caught);
* measures what it stores: the feature set's Parquet, the embedding store, the served LiteRT model;
* starts the API on the registered model: seconds to ready, RSS when ready, ``/predict`` p50 at c=1 (real photos);
* adds 1 % new photos (new variants) and runs the main job again: the incremental retrain.

Only 127.0.0.1 is contacted. The folders are cached under ``--cache`` (made once per factor; ``--fresh`` remakes
them). Prints a Markdown table; ``--json FILE`` keeps every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.bench import REPO, Server, _children, _env, _status_kb, running

SHARED = REPO.parent / "shared" / "data"
DEFAULT_SOURCES = (SHARED / "dandelion-grass",)
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


# ---------------------------------------------------------------- folders of N x the photos


def variant(source: Path, index: int, target: Path) -> None:
    """Variant ``index`` of the photo ``source`` written to ``target`` (index 0: the photo's own bytes)."""
    if index == 0:
        shutil.copyfile(source, target)
        return
    from PIL import Image, ImageEnhance, ImageOps

    seed = int.from_bytes(hashlib.sha256(f"{source.name}:{index}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    angle = rng.uniform(-8, 8)
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    # A crop of 75-95 % of each side, which also cuts the corners the rotation left black.
    fraction = rng.uniform(0.75, 0.95)
    w, h = int(width * fraction), int(height * fraction)
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((left, top, left + w, top + h))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.85, 1.15))
    image.save(target, "JPEG", quality=rng.randint(75, 95))


def _variants(job: tuple[str, int, int, str]) -> int:
    source, first, last, folder = job
    path = Path(source)
    for index in range(first, last):
        target = Path(folder) / f"{path.stem}~{index:03d}.jpg"
        if not target.exists():
            variant(path, index, target)
    return last - first


def photos_of(sources: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(subfolder, photo)`` of every photo in the sources' subfolders (labels and kinds alike)."""
    out = []
    for source in sources:
        for sub in sorted(p for p in source.iterdir() if p.is_dir()):
            out += [(sub.name, p) for p in sorted(sub.iterdir()) if p.suffix.lower() in SUFFIXES]
    return out


def make_folder(sources: Sequence[Path], folder: Path, first: int, last: int, workers: int) -> int:
    """Variants ``first`` to ``last - 1`` of every photo of ``sources`` in ``folder``/<subfolder>/."""
    jobs = []
    for sub, photo in photos_of(sources):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        jobs.append((str(photo), first, last, str(folder / sub)))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_variants, jobs, chunksize=16))


def link_tree(source: Path, target: Path) -> None:
    """``target`` as hard links to ``source``'s files: a working copy that more photos can be added to."""
    for path in source.rglob("*"):
        if path.is_file():
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, out)


# ---------------------------------------------------------------- measuring a run


class PeakRss:
    """The largest total RSS of a process tree, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak_kib = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, sum(_status_kb(pid, "VmRSS") for pid in _children(self.pid)))
            self._stop.wait(self.every)


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    output: str
    metrics: dict[str, float] = field(default_factory=dict)


def embedded_env(work: Path) -> dict[str, str]:
    """The embedded defaults, rooted in ``work`` instead of ``./var``."""
    return {
        "DATABASE_URL": f"sqlite+aiosqlite:///{work}/dandelion.db",
        "OBJECT_STORE_URL": str(work / "objects"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "MLFLOW_LOCAL_ARTIFACT_ROOT": str(work / "mlartifacts"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def main_job(work: Path, folder: Path, log: Path) -> Run:
    argv = [sys.executable, "-m", "services.trainer", "run", "--quiet", "--source", str(folder)]
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(embedded_env(work)), cwd=REPO)
        with PeakRss(process.pid) as peak:
            process.wait()
        seconds = time.perf_counter() - started
    output = log.read_text(errors="replace")
    if process.returncode:
        raise RuntimeError(f"the main job failed ({process.returncode}):\n{output[-3000:]}")
    return Run(seconds, peak.peak_kib / 1024, output, latest_metrics(work))


EMBEDDED = re.compile(r"embed: (\d+) views of (\d+) photos computed by .* in (\d+) s")


def embed_seconds(output: str) -> float:
    """The embedding step's seconds, from the main job's own summary line (0 when nothing was missing)."""
    found = EMBEDDED.findall(output.replace("\r", "\n"))
    return float(found[-1][2]) if found else 0.0


def latest_metrics(work: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"], max_results=1
    )
    return dict(runs[0].data.metrics) if runs else {}


def megabytes(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


# ---------------------------------------------------------------- serving


def serving(work: Path, photos: list[Path], requests: int) -> dict[str, float]:
    env = {
        **embedded_env(work),
        "MODEL_NAME": "dandelion-grass",
        "API_POLL_INTERVAL_S": "3600",
        "API_LOG_LEVEL": "warning",
    }
    server = Server(
        "api", [sys.executable, "-m", "services.api", "--host", "127.0.0.1", "--port", "{port}"], env,
        "/health/ready", work / "api.log",
    )  # fmt: skip
    bodies = [(p.name, p.read_bytes()) for p in photos]
    with running(server), httpx.Client(base_url=server.url, timeout=60) as client:
        for name, body in bodies[:3]:  # warm
            client.post("/predict", files={"file": (name, body, "image/jpeg")}).raise_for_status()
        took = []
        for i in range(requests):
            name, body = bodies[i % len(bodies)]
            started = time.perf_counter()
            client.post("/predict", files={"file": (name, body, "image/jpeg")}).raise_for_status()
            took.append(time.perf_counter() - started)
        return {
            "api_ready_s": server.ready_s,
            "api_rss_mb": server.memory.serving_rss_mb,
            "predict_p50_ms": statistics.median(took) * 1000,
        }


# ---------------------------------------------------------------- one factor


def measure(factor: int, sources: Sequence[Path], cache: Path, keep: Path | None, args: argparse.Namespace) -> dict:
    built = cache / f"{factor}x"
    if args.fresh and built.exists():
        shutil.rmtree(built)
    if not (built / ".complete").exists():
        print(f"{factor}x: making {factor} variant(s) of every photo in {built} ...", flush=True)
        make_folder(sources, built, 0, factor, args.workers)
        (built / ".complete").touch()
    work = Path(tempfile.mkdtemp(prefix=f"scale-{factor}x-", dir=keep))
    folder = work / "photos"
    link_tree(built, folder)
    n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    print(f"{factor}x: {n} photos; the main job in {work} ...", flush=True)
    first = main_job(work, folder, work / "first.log")
    objects = work / "objects"
    tflite = sorted((work / "mlartifacts").rglob("*.tflite"), key=lambda p: p.stat().st_mtime)
    row = {
        "factor": factor,
        "photos": n,
        "main_job_s": first.seconds,
        "peak_rss_mb": first.peak_rss_mb,
        "embed_s": embed_seconds(first.output),
        "feature_set_mb": megabytes((objects / "features").rglob("v0001.parquet")),
        "embeddings_mb": megabytes((objects / "embeddings").rglob("*.parquet")),
        "model_mb": megabytes(tflite[-1:]),
        "cv_accuracy": first.metrics.get("cv_accuracy_mean", float("nan")),
        "flagged": first.metrics.get("domain_cv_flagged", float("nan")),
        "ood_caught": first.metrics.get("domain_ood_caught", float("nan")),
        "failed_lines": [line for line in first.output.splitlines() if line.startswith("error")],
    }
    real = [p for _, p in photos_of(sources[:1])][:: max(1, len(photos_of(sources[:1])) // 16)][:16]
    print(f"{factor}x: main job {first.seconds:.0f} s, peak {first.peak_rss_mb:.0f} MB; the API ...", flush=True)
    row.update(serving(work, real, args.requests))

    # +1 %: new variants of a sample of the photos, then the main job again.
    extra = max(1, n // 100)
    rng = random.Random(factor)
    chosen = rng.sample(photos_of(sources), min(extra, len(photos_of(sources))))
    for sub, photo in chosen:
        _variants((str(photo), factor, factor + 1, str(folder / sub)))
    print(f"{factor}x: +{len(chosen)} photos, the main job again ...", flush=True)
    again = main_job(work, folder, work / "again.log")
    row.update({
        "added": len(chosen),
        "incremental_s": again.seconds,
        "incremental_peak_rss_mb": again.peak_rss_mb,
        "incremental_embed_s": embed_seconds(again.output),
    })  # fmt: skip
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| photos | main job | peak RSS | embeddings | feature set | embedding store | served model | API ready / RSS "
        "| `/predict` p50 c=1 | +1 % retrain (peak) | CV accuracy | flagged | OOD caught |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['photos']:,} | {r['main_job_s']:.0f} s | {r['peak_rss_mb'] / 1024:.2f} GB | {r['embed_s']:.0f} s "
            f"| {r['feature_set_mb'] * 1000:.0f} KB | {r['embeddings_mb']:.0f} MB | {r['model_mb']:.1f} MB "
            f"| {r['api_ready_s']:.1f} s / {r['api_rss_mb']:.0f} MB | {r['predict_p50_ms']:.1f} ms "
            f"| {r['incremental_s']:.0f} s (+{r['added']} photos, embeddings {r['incremental_embed_s']:.0f} s, "
            f"{r['incremental_peak_rss_mb'] / 1024:.2f} GB) "
            f"| {r['cv_accuracy']:.1%} | {r['flagged']:.1%} | {r['ood_caught']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="1,10", help="comma-separated multiples of the photos (default 1,10)")
    parser.add_argument("--source", action="append", type=Path, help="photo folders (default: the 320 photos)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dandelion-scale")
    parser.add_argument("--fresh", action="store_true", help="remake the cached folders")
    parser.add_argument("--keep", type=Path, help="keep each factor's work folder (var/, logs) under this folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes making the variants")
    parser.add_argument("--requests", type=int, default=100, help="sequential /predict requests timed")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    sources = tuple(args.source or DEFAULT_SOURCES)
    for source in sources:
        if not source.is_dir():
            parser.error(f"{source} is not a folder (photos in subfolders, e.g. dandelion/ and grass/)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    rows = []
    for factor in (int(f) for f in args.factors.split(",")):
        rows.append(measure(factor, sources, args.cache, args.keep, args))
        print(table(rows), flush=True)
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
