"""The scale benchmark's folders: N distinct photos per photo (each its own hash, each a valid photo the pipeline
accepts), the same ones every time, and a peak-memory sampler that sees a process tree's growth."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from benchmarks.scale import PeakRss, link_tree, make_folder, photos_of
from shared.images import preprocess


def sample_source(data_dir: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for label in ("dandelion", "grass"):
        (source / label).mkdir(parents=True)
        for photo in sorted((data_dir / label).glob("*.jpg"))[:2]:
            (source / label / photo.name).write_bytes(photo.read_bytes())
    return source


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}


def test_variants_are_distinct_valid_photos_made_the_same_way_every_time(data_dir: Path, tmp_path: Path) -> None:
    source = sample_source(data_dir, tmp_path)
    first, second = tmp_path / "a", tmp_path / "b"
    assert make_folder([source], first, 0, 3, workers=2) == 12
    make_folder([source], second, 0, 3, workers=1)
    made = digests(first)
    assert len(made) == 12 and len(set(made.values())) == 12  # every file its own hash
    assert made == digests(second)  # deterministic
    for sub, photo in photos_of([source]):
        assert (first / sub / f"{photo.stem}~000.jpg").read_bytes() == photo.read_bytes()  # variant 0: the photo
    for path in first.rglob("*.jpg"):
        assert preprocess(path.read_bytes()).shape == (224, 224, 3)
    assert {p.parent.name for p in first.rglob("*.jpg")} == {"dandelion", "grass"}

    copy = tmp_path / "copy"
    link_tree(first, copy)
    assert digests(copy) == made and (copy / "grass").stat().st_ino != (first / "grass").stat().st_ino


def test_the_peak_counts_the_whole_process_tree(tmp_path: Path) -> None:
    grow = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grow!r}])"
    process = subprocess.Popen([sys.executable, "-c", parent])
    with PeakRss(process.pid, every=0.05) as peak:
        process.wait(30)
    assert peak.peak_kib > 300 * 1024, peak.peak_kib
