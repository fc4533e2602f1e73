"""Each benchmark script runs end to end at a tiny size (benchmarks are not timed tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from root_core.tables import CoefficientTable, save_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, tmp_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_optimizer_step_benchmark_smoke(tmp_path):
    out = run_script(
        "optimizer_step.py", "--scale", "0.01", "--repeats", "1", "--table", "muon", tmp_path=tmp_path
    )
    assert "| ROOT / Muon |" in out and "threshold / NS" in out


@pytest.mark.slow
def test_calibration_speed_benchmark_smoke(tmp_path):
    out = run_script("calibration_speed.py", "--shape", "16x48", "--repeats", "1", tmp_path=tmp_path)
    assert "ratio matrix / spectral (full)" in out


@pytest.mark.slow
def test_precision_benchmark_smoke(tmp_path):
    table = CoefficientTable.create(
        name="tiny", default_rows=(3.4445, -4.7750, 2.0315), entries={(16, 48): [(3.4445, -4.7750, 2.0315)]}
    )
    path = save_table(table, tmp_path)
    out = run_script(
        "precision.py",
        "--table",
        str(path),
        "--count",
        "2",
        "--steps",
        "8",
        "--corpus",
        str(BENCHMARKS),
        tmp_path=tmp_path,
    )
    assert "| 16x48 | tiny@1 |" in out and "| 16x48 | polar-express |" in out
