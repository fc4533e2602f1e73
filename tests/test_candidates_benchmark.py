"""benchmarks/candidates.py: both candidates of a robust run, judged on both independent held-out sets."""

from __future__ import annotations

import re

from conftest import run_benchmark


def test_candidates_smoke_reports_the_pick_the_validation_errors_make(tmp_path):
    result = run_benchmark(
        "candidates.py",
        "--shapes",
        "16x48",
        "--iterations",
        "2",
        "--cache",
        str(tmp_path / "c"),
        "--held-out-cache",
        str(tmp_path / "c"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| 16x48 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    robust, guarded = map(float, re.match(r"([\d.]+) / ([\d.]+) \(", cells[1]).groups())
    assert cells[2] == ("guarded" if guarded < robust else "robust")
    # Four ratio cells (set 1, set 1 worst, set 2, set 2 worst), the shipped candidate's in bold.
    side = 1 if cells[2] == "guarded" else 0
    for cell in cells[3:7]:
        halves = cell.split(" / ")
        assert halves[side].startswith("**") and not halves[1 - side].startswith("**"), cell
        worst_or_mean = [float(h.strip("*")) for h in halves]
        assert all(0.0 < r < 10.0 for r in worst_or_mean)
