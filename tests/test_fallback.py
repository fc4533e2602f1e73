"""Never ship rows that lose to the baseline on their own validation (issue 10): fallback, --keep-fitted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MUON, POLAR_EXPRESS
from typer.testing import CliRunner

from calibrate.cli import app, with_default_command
from calibrate.fitting import pipeline
from root_core import orthogonalize
from root_core.tables import CoefficientTable, load_table

runner = CliRunner()
# Seed 1 at 32x32 with 4 synthetic samples and a 3-generation search: the robust rows (0.1166) lose to
# Polar Express (0.1089) on the one validation sample, a deterministic case of a fit that does not hold.
LOSING = ["--shapes", "32x32", "--ratio", "0:1", "--samples", "4", "--iterations", "3", "--seed", "1"]
# Float64 NS of the same polynomial written two ways (scale folded into row 1, or dividing the input by
# 1.02): round-off of ~10 products of O(1) numbers, far below any difference between coefficient sets.
SAME_OUTPUT_ATOL = 1e-12


def invoke(args):
    return runner.invoke(app, with_default_command(args), env={"COLUMNS": "200"})


def _entry(path):
    table = json.loads(path.read_text())
    (entry,) = table["entries"]
    return entry


@pytest.mark.parametrize("steps", [3, 5, 7])
@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 40), (3, 16, 40)], ids=str)
def test_baseline_rows_in_a_scale_1_table_compute_what_polar_express_computes(shape, steps):
    rows = pipeline.baseline_rows("polar-express", steps)
    table = CoefficientTable.create(
        name="t",
        version=1,
        default_rows=rows.rows,
        entries={(16, 16): {"coefficients": rows.rows, "steps": steps}},
    )
    entry = table.schedule_for((16, 16))
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # eps=0: the tables' eps differ (1e-7 against Polar Express's 1e-6); the polynomial is what must agree.
    expected = orthogonalize(G, POLAR_EXPRESS.with_steps(steps), eps=0.0, dtype=torch.float64)
    actual = orthogonalize(G, entry, eps=0.0, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=0, atol=SAME_OUTPUT_ATOL)


def test_the_shared_baseline_is_muons_single_triple():
    rows = pipeline.baseline_rows("muon", 5)
    assert rows.rows == MUON.rows and rows.num_steps == 5


def test_fallback_ships_polar_express_and_records_the_fitted_rows(tmp_path):
    result = invoke([*LOSING, "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "32x32: fitted rows lose to polar-express (validation spectral error" in result.output
    assert "the table uses polar-express's rows (--keep-fitted keeps the fitted ones)" in result.output
    assert "fitted (not shipped)" in result.output
    entry = _entry(tmp_path / "calibrated" / "v1.json")
    fallback = entry["metrics"]["fallback"]
    assert fallback["to"] == "polar-express" and fallback["kept"] is False
    assert fallback["fitted_error"] > fallback["baseline_error"]
    assert entry["coefficients"] == [list(r) for r in pipeline.baseline_rows("polar-express", 5).rows]
    assert entry["coefficients"] != fallback["fitted_coefficients"]
    # The shipped rows' validation error is the baseline's, which the fitted rows did not reach.
    assert entry["metrics"]["validation_error"] == pytest.approx(fallback["baseline_error"], abs=1e-12)
    G = torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shipped = load_table(str(tmp_path / "calibrated" / "v1.json")).schedule_for((32, 32))
    torch.testing.assert_close(
        orthogonalize(G, shipped, eps=0.0, dtype=torch.float64),
        orthogonalize(G, POLAR_EXPRESS, eps=0.0, dtype=torch.float64),
        rtol=0,
        atol=SAME_OUTPUT_ATOL,
    )


def test_keep_fitted_ships_the_fitted_rows_and_says_they_lose(tmp_path):
    result = invoke([*LOSING, "--keep-fitted", "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert (
        "32x32: fitted rows lose to polar-express" in result.output
        and "kept (--keep-fitted)" in result.output
    )
    entry = _entry(tmp_path / "calibrated" / "v1.json")
    assert "fallback" not in entry["metrics"]
    lost = entry["metrics"]["loses_to_baseline"]
    assert lost["kept"] is True and entry["coefficients"] == lost["fitted_coefficients"]
    assert entry["metrics"]["validation_error"] == pytest.approx(lost["fitted_error"])


def test_entry_metrics_record_the_stress_guarantee_price_and_tails(tmp_path):
    result = invoke([*LOSING, "--fit", "mean", "--shapes", "16x48", "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    metrics = _entry(tmp_path / "calibrated" / "v1.json")["metrics"]
    robust = metrics["robust"]
    assert robust["criterion"] == "mean" and robust["price"] == 0.0 and robust["robust_fit_error"] is None
    assert set(robust["stress"]) == {"tail-x0.1", "tail-x0.01", "low-rank"}
    assert all({"error", "baseline_error", "guaranteed"} <= set(v) for v in robust["stress"].values())
    tails = metrics["tails"]
    assert set(tails["stress"]) == set(robust["stress"])
    for stressed in tails["stress"].values():
        assert stressed["lowest_sigma"] < tails["calibration"]["lowest_sigma"]
        assert stressed["fraction_below_1e-3"] >= tails["calibration"]["fraction_below_1e-3"]


def test_an_unknown_fit_criterion_is_one_line(tmp_path):
    result = invoke([*LOSING, "--fit", "minimax", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: invalid --fit 'minimax': expected one of robust, mean" in result.output
    assert not (tmp_path / "calibrated").exists()


# Seed 1 at 32x32 with 8 synthetic samples and a 5-generation search: the robust fit loses to Polar
# Express on validation (0.1470 > 0.1463), the guarded fit wins (0.1436), so the table ships it.
GUARDED_WINS = ["--shapes", "32x32", "--ratio", "0:1", "--samples", "8", "--iterations", "5", "--seed", "1"]


def test_the_guarded_fit_ships_where_its_validation_error_is_lower(tmp_path):
    result = invoke([*GUARDED_WINS, "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert (
        "32x32: the guarded fit (every calibration sample no worse than polar-express) has the lower "
        "validation error, 0.1436 against the robust fit's 0.1470; the table uses it"
    ) in result.output
    entry = _entry(tmp_path / "calibrated" / "v1.json")
    metrics = entry["metrics"]
    assert "fallback" not in metrics
    picked = metrics["candidates"]
    assert picked["chosen"] == "guarded"
    assert entry["coefficients"] == picked["guarded"]["coefficients"] != picked["robust"]["coefficients"]
    assert picked["guarded"]["validation_error"] < picked["robust"]["validation_error"]
    assert metrics["validation_error"] == pytest.approx(picked["guarded"]["validation_error"], abs=1e-12)
    assert metrics["validation_error"] < metrics["baselines"]["polar-express"]["validation_error"]
    assert metrics["robust"]["guard"] == "every calibration sample no worse than polar-express"


def test_the_robust_fit_ships_where_its_validation_error_is_lower(tmp_path):
    result = invoke([*GUARDED_WINS, "--seed", "6", "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "has the lower validation error" not in result.output
    entry = _entry(tmp_path / "calibrated" / "v1.json")
    picked = entry["metrics"]["candidates"]
    assert picked["chosen"] == "robust"
    assert entry["coefficients"] == picked["robust"]["coefficients"]
    assert picked["robust"]["validation_error"] <= picked["guarded"]["validation_error"]
    assert "guard" not in entry["metrics"]["robust"]


def test_both_candidates_are_recorded_when_the_baseline_ships(tmp_path):
    result = invoke([*LOSING, "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "; robust fit 0.1166, guarded fit 0.1108); the table uses polar-express's rows" in result.output
    metrics = _entry(tmp_path / "calibrated" / "v1.json")["metrics"]
    picked = metrics["candidates"]
    assert picked["chosen"] == "guarded"
    assert picked["guarded"]["coefficients"] == metrics["fallback"]["fitted_coefficients"]
    assert picked["guarded"]["validation_error"] > metrics["fallback"]["baseline_error"]


def test_the_mean_criterion_fits_one_candidate(tmp_path):
    result = invoke([*GUARDED_WINS, "--fit", "mean", "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "candidates" not in _entry(tmp_path / "calibrated" / "v1.json")["metrics"]
