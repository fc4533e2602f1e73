"""benchmarks/batched_step.py runs end to end at a tiny size (a benchmark, not a timed test)."""

from __future__ import annotations

import pytest
from conftest import run_benchmark


@pytest.mark.slow
def test_batched_step_benchmark_smoke(tmp_path):
    result = run_benchmark(
        "batched_step.py",
        *("--layers", "2", "--hidden", "16", "--ffn", "24", "--repeats", "1", "--threads", "1"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "14 matrices (8× 16×16, 4× 24×16, 2× 16×24)" in out
    assert "| optimizer | step (s) | first step (s) | vs ROOT batched |" in out
    rows = {line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")}
    assert {"| ROOT batched", "| ROOT per matrix", "| Muon", "| ROOT batched, no threshold"} <= rows
    assert "per matrix / batched: **" in out and "ROOT batched / Muon: **" in out
    assert not list(tmp_path.iterdir())  # nothing written without --record
