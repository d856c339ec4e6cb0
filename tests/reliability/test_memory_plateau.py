"""Memory comes back after the hostile mix (issue #23 MEDIUM 3): it once stayed at 1,462 MiB, 20 s idle, after
peaking at 1,527. A real API process (the API's own CLI, the fake model) takes ordinary traffic (its warm level),
then the hostile mix of ``benchmarks.soak``, then nothing: its RSS must come back near the warm level."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.soak import rss_kib, soak
from tests.conftest import DATA_DIR
from tests.reliability.test_second_probe_medium import start_fake_api

pytestmark = pytest.mark.slow

BACK_WITHIN_MIB = 150
IDLE_DEADLINE_S = 60


def test_rss_returns_near_the_warm_level_after_the_hostile_mix(tmp_path) -> None:
    for api in start_fake_api(tmp_path, "api-memory-plateau.log"):
        results = asyncio.run(
            soak(api.url, api.pid, seconds=20, concurrency=16, data=DATA_DIR, warmup_s=0, hostile=True, warm_s=8)
        )
        report = results.report()
        assert report["errors"] == 0, report["error_kinds"]
        for kind in ("png16", "float-tiff", "eps", "json-57mib", "idle-sockets"):
            assert report["endpoints"][kind]["requests"] > 0, kind
        warm, peak = report["rss_mib"]["warm"], report["rss_mib"]["peak"]
        deadline = time.monotonic() + IDLE_DEADLINE_S
        while (now := rss_kib(api.pid) / 1024) > warm + BACK_WITHIN_MIB and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"RSS MiB: warm {warm:.0f}, peak {peak:.0f}, idle {now:.0f}")
        assert now <= warm + BACK_WITHIN_MIB, f"RSS stayed at {now:.0f} MiB (warm {warm:.0f}, peak {peak:.0f})"
