"""benchmarks/ns_forms.py runs end to end at a tiny size (a benchmark, not a timed test)."""

from __future__ import annotations

import pytest
from conftest import run_benchmark


@pytest.mark.slow
def test_ns_forms_benchmark_smoke(tmp_path):
    result = run_benchmark(
        "ns_forms.py",
        "--shapes",
        "24x80,32x96",
        "--repeats",
        "1",
        "--precision-shapes",
        "16x48",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "| 32×96 |" in out and "| standard / Gram | flop model |" in out
    assert "| now: one batched topk, no host sync |" in out
    assert "| 24×80 | Polar Express |" in out and "| 32×96 | Muon |" in out
    assert "| 16×48 | power law | DeepSeek-V4 (10 steps) | float16 |" in out
    assert not list(tmp_path.iterdir())  # nothing written without --record
