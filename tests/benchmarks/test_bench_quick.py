"""The benchmark script still runs: ``--quick`` against the session's real champion, every row, no errors.

Speed is not asserted here (the numbers of a loaded CI machine mean little); ``benchmarks/README.md`` has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, REPO, api_env

pytestmark = pytest.mark.slow

ROWS = [
    ("mlflow serve", "/invocations"),
    ("ours", "/invocations"),
    ("ours", "/predict"),
    ("ours", "/predict?explain=true"),
    ("ours no-batch", "/predict"),
]


def test_quick_benchmark_prints_every_row_without_errors(real_champion, tmp_path: Path) -> None:
    settings, _ = real_champion
    registry = settings.registry
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "benchmarks.bench", "--quick", "--json", str(out)]
    argv += ["--tracking-uri", registry.tracking_uri, "--model-name", registry.model_name]
    argv += ["--workdir", str(ARTIFACTS / "bench-quick")]
    env = {**os.environ, **api_env(registry)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    report = json.loads(out.read_text())

    cells = {(c["server"], c["endpoint"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == {(server, endpoint, c) for server, endpoint in ROWS for c in (1, 8)}
    assert all(c["errors"] == 0 and c["requests"] > 0 for c in cells.values()), report["cells"]
    assert report["runtime"] == "litert"
    assert report["max_abs_difference_vs_mlflow"] <= 1e-5
    assert report["floor_ms"]["decode_and_forward"] > 0
    assert set(report["servers"]) == {"mlflow serve", "ours", "ours no-batch"}
    for server, endpoint in ROWS:
        assert f"| {server} | {endpoint} | 8 |" in done.stdout
    lines = ("/invocations throughput c=8, ours / mlflow", "/predict p50 c=1 / floor", "errors: 0",
             "/predict p50 c=8, with explain / without")  # fmt: skip
    for line in lines:
        assert line in done.stdout
