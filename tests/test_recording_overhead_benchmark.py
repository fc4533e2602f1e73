"""benchmarks/recording_overhead.py runs end to end at a tiny size (a benchmark, not a timed test)."""

from __future__ import annotations

import pytest
from conftest import run_benchmark


@pytest.mark.slow
def test_recording_overhead_benchmark_smoke(tmp_path):
    result = run_benchmark("recording_overhead.py", "--scale", "0.004", "--repeats", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "4× 16×16, 2× 44×16, 1× 16×44" in out
    rows = {line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")}
    assert {"| plain ROOT", "| recorded step", "| recorder idle", "| 10", "| 100", "| 1000"} <= rows
    assert not list(tmp_path.iterdir())  # recordings go to a temporary folder; nothing without --record
