"""The precision-ceiling benchmark runs end to end at a tiny size, and rejects a bad shape in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_benchmark


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_benchmark("precision_ceiling.py", *args, "--cache", str(tmp_path / "cache"), cwd=tmp_path)


@pytest.mark.slow
def test_precision_ceiling_smoke(tmp_path):
    result = run(tmp_path, "--shapes", "16x48", "--count", "2", "--steps", "8", "--iterations", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 16x48 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    polar, oracle = float(cells[2]), float(cells[3].split()[0])
    # The oracle's search starts from Polar Express, so it can only match or beat it on these matrices.
    assert oracle <= polar + 1e-12
    assert (tmp_path / "cache" / "held-out-harvest").is_dir()


def test_bad_shape_is_one_line(tmp_path):
    result = run(tmp_path, "--shapes", "4096x")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: invalid shape '4096x': expected MxN with positive integers, e.g. 4096x11008"
    ]
