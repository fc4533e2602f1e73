"""Each benchmark script runs end to end at a tiny size (benchmarks are not timed tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BENCHMARKS, run_benchmark

from root_core.tables import CoefficientTable, save_table


def run_script(name: str, *args: str, tmp_path: Path) -> str:
    result = run_benchmark(name, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_optimizer_step_benchmark_smoke(tmp_path):
    out = run_script(
        "optimizer_step.py", "--scale", "0.05", "--repeats", "1", "--table", "muon", tmp_path=tmp_path
    )
    assert "| ROOT / Muon | ROOT / AdamW |" in out and "threshold / NS" in out
    assert "| optimizer | state | step workspace (peak) | state + workspace | vs AdamW |" in out
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| ")}
    assert {"| ROOT", "| Muon", "| AdamW"} <= rows.keys()
    # Muon keeps one momentum buffer per matrix, AdamW two moments: twice the state.
    muon_state, adamw_state = (float(rows[f"| {name}"].split(" | ")[1]) for name in ("Muon", "AdamW"))
    assert adamw_state == pytest.approx(2 * muon_state, abs=0.11)


@pytest.mark.slow
def test_optimizer_step_auto_table_against_polar_express(tmp_path):
    """Issue 14: an auto-step table (each entry's step count is its number of rows) timed against Polar
    Express's 5 steps, with its steps, FLOPs and errors per shape."""
    muon_row = (3.4445, -4.7750, 2.0315)
    table = CoefficientTable.create(
        name="hand-auto", default_rows=muon_row, entries={(81, 81): [muon_row] * 6, (81, 220): [muon_row] * 3}
    )
    path = save_table(table, tmp_path)
    args = ("--scale", "0.02", "--repeats", "1", "--table", "muon", "--auto-table", str(path))
    out = run_script("optimizer_step.py", *args, tmp_path=tmp_path)
    header = "| shapes | auto step (s) | Polar Express step (s) | auto / Polar Express | NS FLOPs auto / PE |"
    lines = out.splitlines()
    block = lines[lines.index("|---|---|---|---|---|", lines.index(header)) + 1]
    assert block.startswith("| 4× 81×81, 2× 220×81, 81×220 |")
    # 4·6 steps at 81² and 3·3 at 81×220, against 5 steps everywhere: matmul FLOPs 4m²n + 2m³ per step.
    square, mlp = 4 * 81 * 81 * 81 + 2 * 81**3, 4 * 81 * 81 * 220 + 2 * 81**3
    ratio = (4 * 6 * square + 3 * 3 * mlp) / (5 * (4 * square + 3 * mlp))
    assert block.rstrip(" |").endswith(f"{ratio:.2f}")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines() if " / 5 | " in line}
    assert rows["| 81×81"][1] == "6 / 5" and rows["| 81×220"][1] == "3 / 5"
    assert rows["| 81×81"][6] == "not recorded"  # a hand-made table carries no validation metrics


@pytest.mark.slow
def test_calibration_speed_benchmark_smoke(tmp_path):
    out = run_script(
        "calibration_speed.py",
        *("--shapes", "16x48,8x32", "--shape", "16x48", "--repeats", "1", "--samples", "4"),
        *("--harvest-steps", "8", "--fit-iterations", "2"),
        tmp_path=tmp_path,
    )
    assert "| harvest | synthetic | spectra | fit | check | total | fit share |" in out
    assert "| 16x48 | 1 + 3; 3; 1 |" in out and "| 8x32 | 1 + 3; 3; 1 |" in out
    assert "ratio matrix / spectral (full)" in out and "median of the 4 samples above" in out


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
        "--cache",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    assert "| 16x48 | tiny@1 |" in out and "| 16x48 | polar-express |" in out
    assert "| 16x48 | classic |" in out and "| 16x48 | you-6step |" in out
    assert "| max P on [0,1] | max P, 2% rounding margin |" in out
    # The independent set: 6 matrices, 2 per phase, 3 per optimizer, scored by every set.
    assert "| shape | samples | tiny@1 | muon | polar-express | root-paper | you-6step | classic |" in out
    for group in ("independent (6)", "independent early (2)", "independent mid (2)", "independent late (2)"):
        assert f"| 16x48 | {group} |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 16x48 | independent muon (3) |"))
    assert [cell.strip() for cell in row.strip("|").split("|")][5] == "—"  # root-paper: no 16x48 entry
    assert "| 16x48 | independent adamw (3) |" in out
    assert "postln-muon-plain, postln-adamw-torch" in out


@pytest.mark.slow
def test_precision_leaderboard_smoke(tmp_path):
    """Sets side by side, one row per synthetic family, "—" where no given table lists the shape."""
    shared = CoefficientTable.create(
        name="tiny-shared", default_rows=(3.4445, -4.7750, 2.0315), entries={(16, 48): [(3.4, -4.7, 2.0)]}
    )
    per_step = CoefficientTable.create(
        name="tiny",
        default_rows=(3.4445, -4.7750, 2.0315),
        entries={(16, 48): [(3.4445, -4.7750, 2.0315)] * 4 + [(1.875, -1.25, 0.375)]},
    )
    paths = [save_table(table, tmp_path) for table in (per_step, shared)]
    out = run_script(
        "precision.py",
        "--leaderboard",
        *(arg for path in paths for arg in ("--table", str(path))),
        "--shapes",
        "16x48,8x32",
        "--count",
        "2",
        "--steps",
        "8",
        "--synthetic-matrix-count",
        "0",
        "--independent-count",
        "2",
        "--corpus",
        str(BENCHMARKS),
        "--cache",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    header = (
        "| shape | samples | muon | polar-express | root-paper | you-6step | classic | ours shared |"
        " ours per-step |"
    )
    assert out.count(header) == 2  # float64 spectral and bf16 matrix
    for family in ("gaussian", "heavy_tailed", "low_rank_noise", "row_col_scaled"):
        assert f"| 16x48 | synthetic {family} (1) |" in out
    assert "| 16x48 | held-out real (1) |" in out  # the bf16 row: one matrix checked
    assert "ours per-step = tiny@1, ours shared = tiny-shared@1" in out
    row = next(line for line in out.splitlines() if line.startswith("| 16x48 | max P on [0,1] |"))
    assert [cell.strip() for cell in row.strip("|").split("|")][6] == "1.0000"  # classic's exact range
    assert "| 16x48 | max P, 2% rounding margin |" in out
    eight = [line for line in out.splitlines() if line.startswith("| 8x32 | held-out real (2) |")]
    cells = [cell.strip() for cell in eight[0].strip("|").split("|")]
    assert [cells[i] for i in (4, 7, 8)] == ["—"] * 3  # root-paper and both of ours: no entry
    assert "| 8x32 | independent late (1) |" in out and "| 16x48 | independent adamw (1) |" in out


def test_precision_refuses_a_table_calibrated_on_the_independent_probes(tmp_path):
    table = CoefficientTable.create(
        name="leaky",
        default_rows=(3.4445, -4.7750, 2.0315),
        entries={(16, 48): [(3.4445, -4.7750, 2.0315)]},
        provenance={"harvest_probes": ["llama-muon", "postln-adamw-torch"]},
    )
    result = run_benchmark("precision.py", "--table", str(save_table(table, tmp_path)), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "table leaky@1 was calibrated on postln-adamw-torch: not held out"
    )


@pytest.mark.slow
def test_precision_second_independent_set(tmp_path):
    """--independent-set 2: the parallel probes, seed 2, the package-metadata prose, its own cache folder;
    the held-out rows are the same harvest as without the option."""
    table = CoefficientTable.create(
        name="tiny", default_rows=(3.4445, -4.7750, 2.0315), entries={(16, 48): [(3.4445, -4.7750, 2.0315)]}
    )
    path = save_table(table, tmp_path)
    cache = tmp_path / "cache"
    args = ("--table", str(path), "--count", "2", "--steps", "8", "--corpus", str(BENCHMARKS))
    args += ("--independent-set", "2", "--cache", str(cache))
    out = run_script("precision.py", *args, tmp_path=tmp_path)
    assert "Independent held-out momentum (set 2): 6 per shape from probes parallel-muon-warm, " in out
    assert "seed 2, corpus: the installed packages' dist-info METADATA and LICENSE files" in out
    assert "Independent held-out momentum (set 2), mean float64 spectral error" in out
    for group in ("independent (6)", "independent early (2)", "independent late (2)", "independent muon (3)"):
        assert f"| 16x48 | {group} |" in out
    assert "| 16x48 | independent adamw (3) |" in out and "postln" not in out
    # One harvest per folder: the held-out one where it always was, the second set's apart.
    assert len(list((cache / "held-out-harvest").iterdir())) == 1
    (second,) = (cache / "held-out-harvest-2").iterdir()
    rows = [line for line in out.splitlines() if line.startswith("| 16x48 | independent")]
    again = run_script("precision.py", *args, tmp_path=tmp_path)
    assert [line for line in again.splitlines() if line.startswith("| 16x48 | independent")] == rows
    assert list((cache / "held-out-harvest-2").iterdir()) == [second]  # read back, not harvested again


def test_precision_refuses_a_table_calibrated_on_the_second_set_probes(tmp_path):
    table = CoefficientTable.create(
        name="leaky",
        default_rows=(3.4445, -4.7750, 2.0315),
        entries={(16, 48): [(3.4445, -4.7750, 2.0315)]},
        provenance={"harvest_probes": ["parallel-muon-warm"]},
    )
    path = str(save_table(table, tmp_path))
    result = run_benchmark("precision.py", "--table", path, "--independent-set", "2", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "table leaky@1 was calibrated on parallel-muon-warm: not held out"
    )


@pytest.mark.slow
def test_harvest_tails_smoke(tmp_path):
    out = run_script(
        "harvest_tails.py", "--shapes", "16x48", "--steps", "8", "--probes", "gpt-adamw", tmp_path=tmp_path
    )
    assert (
        "| shape | probe | phase | step / run | layer | σ < 1e-3 σ_max | σ < 1e-2 σ_max | σ_min/σ_max |"
        in out
    )
    rows = [line for line in out.splitlines() if line.startswith("| 16x48 | gpt-adamw |")]
    assert [row.split(" | ")[2:4] for row in rows] == [["early", "3/8"], ["mid", "4/8"], ["late", "8/8"]]
