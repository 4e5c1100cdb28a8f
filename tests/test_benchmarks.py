"""The benchmark suite's verdicts on issue #3's targets, from measurements given here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import targets


def row(case, method, n, seconds, peak_mb):
    return {"case": case, "method": method, "n": n, "seconds": seconds,
            "peak_bytes": peak_mb * 1e6, "input_bytes": 1}


RESULTS = [
    row("floor", "mean", 50, 0.5, 100),
    row("stacker 2GB", "sigma_clip", 50, 1.25, 230),
    row("stacker 2GB +QC", "sigma_clip", 50, 1.5, 235),
    row("stacker 2GB", "mean", 50, 0.9, 190),
    row("stacker 2GB", "minmax", 50, 0.99, 190),
    row("siril", "sigma_clip", 50, 8.0, 1800),
    row("stacker 1-pass", "sigma_clip", 50, 1.2, 230),
    row("ccdproc", "sigma_clip", 50, 30.0, 7590),
    row("floor", "mean", 200, 1.8, 100),
    row("stacker 2GB", "sigma_clip", 200, 3.6, 2300),
    row("stacker 2GB", "mean", 200, 1.6, 190),
    row("stacker 2GB", "minmax", 200, 1.6, 190),
    row("stacker flats", "sigma_clip", 50, 1.9, 300),
]


def test_every_measured_target_is_judged_with_its_numbers():
    lines = targets(RESULTS, ["2GB"], help_seconds=0.2)
    assert "- met: stacker 2GB sigma_clip N=50: 2.50x the floor (<= 4x)" in lines
    assert "- NOT met: stacker 2GB mean N=50: 1.80x the floor (<= 1.3x)" in lines
    assert "- met: stacker 2GB minmax N=50: 1.98x the floor (<= 2x)" in lines
    assert "- met: stacker / Siril N=50: 0.16x its time (<= 0.5x)" in lines
    assert "- NOT met: ccdproc / stacker 1-pass sigma_clip N=50: 25.0x (>= 30x)" in lines
    assert "- NOT met: stacker 2GB sigma_clip N=200: peak 2300 MB (<= 2250 MB)" in lines
    assert "- met: stacker 2GB +QC sigma_clip N=50: peak 235 MB (<= 2250 MB)" in lines
    assert "- NOT met: peak N=200 / N=50 stacker 2GB sigma_clip: 10.00 (<= 1.1)" in lines
    assert "- met: peak N=200 / N=50 stacker 2GB mean: 1.00 (<= 1.1)" in lines
    assert "- met: flats / darks N=50: 1.52 (<= 1.5)" not in lines
    assert "- NOT met: flats / darks N=50: 1.52 (<= 1.5)" in lines
    assert "- met: `stacker --help` 0.20 s (< 0.5 s)" in lines
    # +QC rows are judged on memory only: quality control is not in the floor targets
    assert not any("+QC sigma_clip N=50: 3.00x" in line for line in lines)


def test_cold_runs_are_judged_on_memory_and_the_full_frame_peak():
    cold = [row("disk", "-", 200, 9.0, 60), row("floor", "mean", 200, 25.0, 280),
            row("stacker 2GB", "sigma_clip", 200, 18.5, 712)]
    lines = targets(cold, ["2GB"], cold=True, full_frame=True)
    assert lines == ["- met: stacker 2GB sigma_clip N=200: peak 712 MB (<= 2250 MB)",
                     "- met: 200 full frames, stacker 2GB sigma_clip: peak 0.71 GB (< 2.3 GB)"]
