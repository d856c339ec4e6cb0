"""A short soak of the real API on the real champion: ``benchmarks/soak.py`` must see no error at all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ARTIFACTS, REPO, api_env

pytestmark = pytest.mark.slow


def test_short_soak_has_no_errors(real_champion) -> None:
    settings, _ = real_champion
    report_path = ARTIFACTS / "soak.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--seconds",
            "15",
            "--concurrency",
            "8",
            "--log",
            str(ARTIFACTS / "soak-api.log"),
            "--json",
            str(report_path),
        ],
        env={**api_env(settings.registry), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["errors"] == 0, report["error_kinds"]
    assert all(e["requests"] > 0 for e in report["endpoints"].values()), report["endpoints"]
    assert report["rss_mib"]["start"] is not None
