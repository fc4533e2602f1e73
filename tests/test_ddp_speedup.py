"""benchmarks/ddp_speedup.py runs end to end at a tiny size (2 gloo processes; not a timed test)."""

from __future__ import annotations

import pytest
from conftest import run_benchmark


@pytest.mark.slow
def test_ddp_speedup_benchmark_smoke(tmp_path):
    result = run_benchmark(
        "ddp_speedup.py", "--scale", "0.02", "--blocks", "1", "--repeats", "1", cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "(s)" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "1 process, 1 thread",
        "1 process, 2 threads",
        "2 ranks × 1 thread (DDP split)",
    ]
