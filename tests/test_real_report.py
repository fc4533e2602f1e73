"""`root-calibrate report TABLE --real PATH` (issue 10): a table against the baselines on user momentum."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import MUON, POLAR_EXPRESS
from safetensors.torch import save_file
from typer.testing import CliRunner

from calibrate.cli import app, with_default_command
from calibrate.fitting.objective import sample_errors
from calibrate.sampling.base import Sample
from calibrate.sampling.harvest import save_harvest
from calibrate.spectra import normalized_spectrum
from root_core.tables import CoefficientTable, save_table

runner = CliRunner()
# The recorded tails of the table below: its calibration spectra reached σ/σ_max = 1e-3, its guaranteed
# stress sets 1e-5 with a quarter of σ below 1e-3.
TAILS = {
    "calibration": {"fraction_below_1e-3": 0.0, "lowest_sigma": 1e-3},
    "stress": {
        "tail-x0.1": {"fraction_below_1e-3": 0.25, "lowest_sigma": 1e-4},
        "tail-x0.01": {"fraction_below_1e-3": 0.25, "lowest_sigma": 1e-5},
    },
}
GUARANTEED = {"guaranteed": ["tail-x0.1", "tail-x0.01"]}
# The spectral identity holds to ~1e-9 in float64 (tests/test_calibration_math.py); float32 NS on these
# clipped 32x32 matrices sits within 1e-4 of it.
FLOAT32_ATOL = 1e-4


def invoke(args):
    return runner.invoke(app, with_default_command(args))


def spectrum_matrix(m, n, low, seed=0):
    """An m×n matrix whose singular values fall log-evenly from 1 to 10^low."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    return ((U * torch.logspace(0, low, m, dtype=torch.float64)) @ V.T).float()


def write_table(folder, metrics):
    table = CoefficientTable.create(
        name="tiny",
        default_rows=MUON.rows,
        entries={(32, 32): {"coefficients": MUON.rows, "steps": 5, "metrics": metrics}},
        provenance={"clip_quantile": None},
    )
    return save_table(table, folder)


def harvest_file(path, matrices):
    samples = [Sample(matrix=m, kind="real", source=f"harvest:test:{i}") for i, m in enumerate(matrices)]
    return save_harvest(samples, path)


def report_rows(output):
    (start,) = [i for i, line in enumerate(output.splitlines()) if line.startswith("shape,")]
    lines = output.splitlines()[start:]
    header, *lines = [line.split(",") for line in lines if "," in line and not line.startswith("warning:")]
    return [dict(zip(header, line, strict=True)) for line in lines]


def test_report_real_scores_the_table_against_both_baselines_and_warns_on_a_deeper_tail(tmp_path):
    table = write_table(tmp_path / "tables", {"tails": TAILS, "robust": GUARANTEED})
    shallow, deep = spectrum_matrix(32, 32, -2), spectrum_matrix(32, 32, -7, seed=1)
    momentum = harvest_file(tmp_path / "m.safetensors", [shallow, deep, torch.randn(16, 48)])
    result = invoke(["report", str(table), "--real", str(momentum), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = report_rows(result.output)
    assert [(r["shape"], r["table"]) for r in rows] == [
        ("32x32", "tiny@1"),
        ("32x32", "muon"),
        ("32x32", "polar-express"),
    ]
    spectra = torch.stack([normalized_spectrum(m, clip_quantile=None) for m in (shallow, deep)])
    for row, schedule in zip(rows, (MUON, MUON, POLAR_EXPRESS), strict=True):
        errors = sample_errors(spectra, schedule)
        assert float(row["spectral_mean"]) == pytest.approx(float(errors.mean()), rel=1e-9)
        assert float(row["float32_mean"]) == pytest.approx(float(errors.mean()), abs=FLOAT32_ATOL)
        assert int(row["samples"]) == 2
    assert float(rows[2]["ratio_vs_polar-express"]) == 1.0
    assert "warning: 16x48: in the files but not in tiny@1; its default rows (Muon's) would serve it" in (
        result.output
    )
    assert re.search(
        r"warning: 32x32: this momentum is deeper-tailed than anything tiny@1 was calibrated", result.output
    )


def test_no_deep_tail_warning_within_the_guaranteed_stress_sets(tmp_path):
    table = write_table(tmp_path / "tables", {"tails": TAILS, "robust": GUARANTEED})
    momentum = harvest_file(tmp_path / "m.safetensors", [spectrum_matrix(32, 32, -4)])  # lowest 1e-4
    result = invoke(["report", str(table), "--real", str(momentum)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "tiny@1" in result.output
    # The same momentum is deeper than the calibration alone: without guaranteed stress sets, it warns.
    unguaranteed = write_table(tmp_path / "other", {"tails": TAILS, "robust": {"guaranteed": []}})
    result = invoke(["report", str(unguaranteed), "--real", str(momentum)])
    assert "warning: 32x32: this momentum is deeper-tailed" in result.output


def test_a_table_without_tail_statistics_says_it_cannot_tell(tmp_path):
    table = write_table(tmp_path / "tables", {})
    momentum = harvest_file(tmp_path / "m.safetensors", [spectrum_matrix(32, 32, -2)])
    result = invoke(["report", str(table), "--real", str(momentum)])
    assert result.exit_code == 0, result.output
    assert "warning: 32x32: tiny@1 records no calibration tail statistics" in result.output


def test_optimizer_state_momentum_is_always_accepted_and_plain_tensors_need_the_flag(tmp_path):
    weight = torch.nn.Parameter(spectrum_matrix(32, 32, -2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = spectrum_matrix(32, 32, -3, seed=2)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    result = invoke(["report", "polar-express", "--real", str(tmp_path / "optimizer.pt")])
    assert result.exit_code == 0, result.output
    assert "32x32" in result.output and "warning" not in result.output  # a baseline table: nothing calibrated

    save_file({"w": spectrum_matrix(32, 32, -2)}, tmp_path / "weights.safetensors")
    refused = invoke(["report", "muon", "--real", str(tmp_path / "weights.safetensors")])
    assert refused.exit_code == 1 and "--real-is-momentum" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    flagged = invoke(
        ["report", "muon", "--real", str(tmp_path / "weights.safetensors"), "--real-is-momentum"]
    )
    assert flagged.exit_code == 0, flagged.output


def test_a_missing_real_path_is_one_line(tmp_path):
    result = invoke(["report", "muon", "--real", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert f"error: real momentum path does not exist: {tmp_path / 'nowhere'}" in result.output


def test_end_to_end_calibrate_then_report_real(tmp_path):
    calibrated = invoke(
        [
            *("--shapes", "32x32", "--ratio", "0:1", "--samples", "4", "--iterations", "3"),
            *("--out", str(tmp_path / "tables"), "--no-cache", "--quiet"),
        ]
    )
    assert calibrated.exit_code == 0, calibrated.output
    table = tmp_path / "tables" / "calibrated" / "v1.json"
    metrics = json.loads(table.read_text())["entries"][0]["metrics"]
    momentum = harvest_file(tmp_path / "m.safetensors", [spectrum_matrix(32, 32, -9)])
    result = invoke(["report", str(table), "--real", str(momentum), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert [r["table"] for r in report_rows(result.output)] == ["calibrated@1", "muon", "polar-express"]
    deeper = "warning: 32x32: this momentum is deeper-tailed than anything calibrated@1"
    # σ/σ_max down to 1e-9 is below every recorded set, unless the entry already ships Polar Express's rows.
    assert (deeper in result.output) == ("fallback" not in metrics)
