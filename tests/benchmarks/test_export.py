"""The export benchmark builds every step of the served network on the real backbone and times each."""

from __future__ import annotations

import pytest

from benchmarks.export import STEPS, main


@pytest.mark.slow
def test_every_step_is_converted_and_timed(capsys) -> None:
    assert main(["--resolutions", "96", "--rounds", "1", "--repeats", "2", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 96 |")]
    assert [row.split(" | ")[1] for row in rows] == list(STEPS)
    assert rows[0].endswith("| 1.00 |")  # the first step is the baseline of the ratios
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)
