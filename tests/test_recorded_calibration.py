"""The closed loop (issue 12): train with recording → root-calibrate --real DIR → ROOT(table=...).

Also calibration's and the analysis commands' handling of recordings: spectra as samples, provenance,
phases, and bad input (other shapes, a corrupted file, another clip quantile) as one line and no file.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from calibrate.analysis.real_report import REAL_TITLE, STEPS_TITLE
from calibrate.cli import app, with_default_command
from calibrate.fitting.objective import sample_errors
from calibrate.sampling.real import load_real_samples
from calibrate.sampling.recorded import SpectrumSample, normalized
from calibrate.spectra import normalized_spectrum
from root_core import ROOT, load_table
from root_core.recording import read_recorded_matrices, read_recordings

STEPS = 24
RECORD_EVERY = 3  # steps 1, 4, …, 22: eight recorded steps
# Both sides take eigvalsh of a float64 Gram matrix of the same clipped update; they differ only in
# where the division by ‖B‖_F happens (before or after the square root), ~1e-16 per value.
SPECTRUM_ATOL = 1e-12


class TinyModel(nn.Module):
    """16×32 (input and output projections, one shape) and 32×32 (two hidden matrices)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.hidden = nn.Linear(32, 32, bias=False)
        self.hidden2 = nn.Linear(32, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))
        return self.down(torch.tanh(self.hidden2(torch.tanh(self.hidden(h)))))


def train(optimizer_kwargs: dict, steps: int = STEPS) -> tuple[nn.Module, ROOT]:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = ROOT(model.named_parameters(), lr=0.02, **optimizer_kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator)
        optimizer.zero_grad()
        (model(x) - x).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "momentum"
    train({"record_dir": folder, "record_every": RECORD_EVERY, "record_matrices": ["hidden.*"]})
    return folder


def invoke(*args: str):
    return CliRunner().invoke(app, with_default_command(list(args)))


CALIBRATE_FAST = ("--samples", "8", "--iterations", "3", "--no-cache", "--quiet")


@pytest.mark.slow
def test_train_record_calibrate_train_end_to_end(tmp_path, monkeypatch, recordings):
    """The README sequence at a tiny size: the table lands on ROOT's search path under the given name."""
    monkeypatch.setenv("ROOT_COEFF_HOME", str(tmp_path / "tables"))
    result = invoke("--real", str(recordings), "--name", "mine", "--ratio", "1:0", *CALIBRATE_FAST)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(tmp_path / "tables" / "mine" / "v1.json")
    table = load_table("mine")
    assert table.shapes == [(16, 32), (32, 32)]  # the recorded shapes, no --shapes needed
    provenance = table.provenance
    assert provenance["ratio"] == "1:0" and provenance["real_per_shape"]["16x32"] == {
        "files": 8,
        "harvest": 0,
    }
    # Provenance names each sample's file, parameter and step; the samples span the run (phases).
    first = provenance["sources"]["16x32"][0]
    assert first == f"file:{recordings}/step00000001.rank0.safetensors:sigma:up.weight@step1"
    assert provenance["recorded_steps"]["32x32"][0] == 1 and provenance["recorded_steps"]["32x32"][-1] == 22
    assert provenance["recorded_steps"]["16x32"][-1] >= 19
    model, optimizer = train({"table": "mine"}, steps=2)
    assert optimizer.table.name == "mine"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recorded_spectra_are_the_samples_calibrate_would_compute(recordings):
    """A recorded spectrum, normalised, is calibrate/spectra.py's spectrum of the recorded update."""
    matrices = {(m.step, m.name): m for m in read_recorded_matrices(recordings)}
    spectra = {(s.step, s.name): s for s in read_recordings(recordings)}
    assert len(matrices) == 8  # hidden.weight only: "hidden.*" does not match hidden2.weight
    for key, matrix in matrices.items():
        expected = normalized_spectrum(matrix.update, clip_quantile=matrix.clip_quantile)
        torch.testing.assert_close(
            normalized(spectra[key].singular_values), expected, rtol=0, atol=SPECTRUM_ATOL
        )


def test_recordings_load_as_spectrum_and_matrix_samples(recordings):
    found = load_real_samples([recordings], [(32, 32), (16, 32)])
    square = found[(32, 32)]
    assert len(square) == 16  # 8 steps × (hidden: a matrix, hidden2: a spectrum)
    kinds = {s.meta["param_name"]: type(s).__name__ for s in square}
    assert kinds == {"hidden.weight": "Sample", "hidden2.weight": "SpectrumSample"}
    assert all(isinstance(s, SpectrumSample) and not s.has_matrix for s in found[(16, 32)])
    assert [s.meta["step"] for s in found[(16, 32)][::2]] == list(range(1, STEPS, RECORD_EVERY))
    # Step order, each step's matrices rotated by its rank among the steps: every other sample (what
    # calibration's even spread of 8 out of 16 takes) alternates between the two parameters.
    assert [s.meta["param_name"] for s in square[::2]] == ["hidden.weight", "hidden2.weight"] * 4


def _no_table_written(tmp_path: Path) -> bool:
    return not any((tmp_path / "tables").rglob("*.json"))


def test_recordings_of_other_shapes_than_asked_are_one_line_and_no_file(tmp_path, monkeypatch, recordings):
    monkeypatch.setenv("ROOT_COEFF_HOME", str(tmp_path / "tables"))
    result = invoke("--real", str(recordings), "--shapes", "8x64", "--name", "mine", *CALIBRATE_FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = (
        f"error: --real {recordings} holds no recording of shape 8x64 (its recordings are of 16x32, 32x32); "
        "calibrate the recorded shapes"
    )
    assert result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _no_table_written(tmp_path)


def test_a_corrupted_recording_is_one_line_naming_it_and_no_file(tmp_path, monkeypatch, recordings):
    monkeypatch.setenv("ROOT_COEFF_HOME", str(tmp_path / "tables"))
    folder = tmp_path / "momentum"
    folder.mkdir()
    for source in sorted(recordings.iterdir())[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    broken = sorted(folder.iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:-20])
    result = invoke("--real", str(folder), "--name", "mine", *CALIBRATE_FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.match(re.escape(f"error: cannot read momentum recording {broken}: tensor "), result.output)
    assert len(result.output.strip().splitlines()) == 1
    assert _no_table_written(tmp_path)


def test_another_clip_quantile_than_recorded_is_refused(tmp_path, monkeypatch, recordings):
    monkeypatch.setenv("ROOT_COEFF_HOME", str(tmp_path / "tables"))
    result = invoke("--real", str(recordings), "--clip-quantile", "0.8", "--name", "mine", *CALIBRATE_FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "was clipped at quantile 0.9 (the run's outlier_quantile) but the calibration clips at 0.8" in (
        result.output
    )
    assert result.output.strip().endswith("pass --clip-quantile 0.9")
    assert _no_table_written(tmp_path)


def test_no_shapes_and_no_recordings_is_one_line(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    torch.save({"w": torch.ones(4, 4)}, folder / "w.momentum.pt")
    result = invoke("--real", str(folder), "--name", "mine", *CALIBRATE_FAST)
    assert result.exit_code == 1
    assert result.output.startswith("error: give at least one of --shapes, --arch or --config (--real ")


def test_report_real_shows_each_set_per_shape_and_per_recorded_step(recordings):
    result = invoke("report", "muon", "--real", str(recordings), "--format", "csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout))
    overall = frame[frame["step"] == "all"]
    assert set(overall["shape"]) == {"16x32", "32x32"}
    assert {"muon@1", "polar-express"} <= set(overall["table"])
    by_step = frame[frame["step"] != "all"].astype({"step": int})
    assert sorted(set(by_step["step"])) == list(range(1, STEPS, RECORD_EVERY))
    # Step 1's 16x32 row: Polar Express's mean error on the two spectra recorded then, computed here.
    spectra = [normalized(s.singular_values) for s in read_recordings(recordings) if s.step == 1]
    spectra = [s for s in spectra if s.numel() == 16]
    expected = float(
        sample_errors(torch.stack(spectra), load_table("polar-express").schedule_for((16, 32))).mean()
    )
    row = by_step[
        (by_step["step"] == 1) & (by_step["shape"] == "16x32") & (by_step["table"] == "polar-express")
    ]
    assert row["samples"].item() == 2
    assert row["spectral_mean"].item() == pytest.approx(expected, rel=1e-9)


def test_report_real_table_format_has_the_per_step_section(recordings):
    result = invoke("report", "muon", "--real", str(recordings))
    assert result.exit_code == 0, result.output
    assert STEPS_TITLE in result.stdout and REAL_TITLE in result.stdout


def test_plot_real_draws_the_error_over_training_steps(tmp_path, recordings):
    result = invoke("plot", "muon", "--shapes", "16x32", "--real", str(recordings), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any("training" in name for name in written), written


def test_report_real_on_a_corrupted_recording_is_one_line(tmp_path, recordings):
    folder = tmp_path / "momentum"
    folder.mkdir()
    source = sorted(recordings.iterdir())[0]
    broken = folder / source.name
    broken.write_bytes(source.read_bytes()[:-20])
    result = invoke("report", "muon", "--real", str(folder))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"error: cannot read momentum recording {broken}: tensor ")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_torchrun_ranks_calibrate_the_same_table_from_recordings(tmp_path, recordings):
    """Spectrum-only samples in the rank split: no matrix to hold or check, the same table as one process."""
    from test_calibrate_ranks import torchrun

    args = [
        "--real",
        str(recordings),
        "--name",
        "mine",
        "--ratio",
        "1:0",
        *CALIBRATE_FAST,
        "--check-samples",
        "3",
    ]
    single = invoke(*args, "--out", str(tmp_path / "one"))
    assert single.exit_code == 0, single.output
    split = torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "mine" / "v1.json").read_text())
    two = json.loads((tmp_path / "two" / "mine" / "v1.json").read_text())
    for a, b in zip(one["entries"], two["entries"], strict=True):
        assert a["coefficients"] == b["coefficients"]
        drop = ("seconds",)
        assert {k: v for k, v in a["metrics"].items() if k not in drop} == {
            k: v for k, v in b["metrics"].items() if k not in drop
        }
    checked = {e["shape"][0]: e["metrics"]["samples"]["matrix_checked"] for e in one["entries"]}
    assert checked[16] == 0 and checked[32] >= 1  # 32x32 validation holds recorded whole updates
    assert two["provenance"]["sources"] == one["provenance"]["sources"]
