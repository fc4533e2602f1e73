"""root-calibrate through typer's CliRunner: help, one-line errors that write nothing, real tiny runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from calibrate import cli
from calibrate.cli import app, with_default_command
from calibrate.fitting import pipeline
from calibrate.sampling.synthetic import DEFAULT_MIX
from root_core import ROOT, load_table

runner = CliRunner()
# A tiny but complete run: harvest + synthetic at 1:2, spectra, a short search, the matrix check.
TINY = [
    "--shapes",
    "16x48",
    "--samples",
    "6",
    "--ratio",
    "1:2",
    "--iterations",
    "4",
    "--harvest-steps",
    "12",
    "--quiet",
]


def invoke(args: list[str]):
    return runner.invoke(app, with_default_command(args))


def test_help_shows_an_example():
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    assert "root-calibrate --shapes 4096x11008 --ratio 1:3" in result.output
    calibrate_help = invoke(["calibrate", "--help"])
    assert calibrate_help.exit_code == 0 and "--clip-quantile" in calibrate_help.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--shapes", "4096x"],
            "invalid shape '4096x': expected MxN with positive integers, e.g. 4096x11008",
        ),
        (["--shapes", "0x5"], "invalid shape '0x5': expected MxN with positive integers"),
        (["--shapes", "abc"], "invalid shape 'abc': expected MxN with positive integers"),
        (["--shapes", "64x64", "--ratio", "1:0:3"], "invalid ratio '1:0:3'"),
        (["--shapes", "64x64", "--ratio", "0:0"], "invalid ratio '0:0'"),
        (["--shapes", "64x64", "--ratio", "-1:3"], "invalid ratio '-1:3'"),
        (["--shapes", "64x64", "--real", "does/not/exist.pt"], "does/not/exist.pt"),
        (["--shapes", "64x64", "--clip-quantile", "1.5"], "invalid --clip-quantile '1.5'"),
        (["--shapes", "64x64", "--schedule", "tiled"], "invalid schedule 'tiled'"),
        (
            ["--shapes", "64x64", "--families", "gaussian,laplace"],
            "invalid --families 'gaussian,laplace': unknown family 'laplace'; choose from gaussian,",
        ),
        (["--shapes", "64x64", "--device", "tpu"], "invalid --device 'tpu'"),
        (["--shapes", "64x64", "--samples", "1"], "invalid --samples 1"),
        (["--arch", "llama-9"], "unknown architecture 'llama-9'"),
        ([], "give at least one of --shapes, --arch or --config"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_work(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("long work started on bad input"))
    result = invoke(
        [*args, "--out", str(tmp_path / "tables"), "--quiet"] if args else ["calibrate", "--quiet"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "tables").exists()


def test_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("long work started on bad input"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke(["--shapes", "16x48", "--out", str(blocker / "tables"), "--quiet"])
    assert result.exit_code == 1 and f"cannot write to --out '{blocker / 'tables'}'" in result.output


def test_a_failure_mid_run_leaves_no_table(tmp_path, monkeypatch):
    def broken_fit(*args, **kwargs):
        raise pipeline.CalibrationError("search failed: injected")

    monkeypatch.setattr(pipeline, "fit", broken_fit)
    result = invoke([*TINY, "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 1 and "error: search failed: injected" in result.output
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_a_table_that_root_loads_and_is_reproducible(tmp_path):
    first = invoke([*TINY, "--out", str(tmp_path), "--name", "tiny", "--cache", str(tmp_path / "cache")])
    assert first.exit_code == 0, first.output
    path = Path(first.output.strip().splitlines()[-1])
    assert path == tmp_path / "tiny" / "v1.json"
    table = load_table(path)
    entry = table.entry((48, 16))
    assert table.shapes == [(16, 48)] and entry.metrics["bound"] <= 1.25
    assert entry.metrics["samples"]["real"] == 2 and entry.metrics["samples"]["synthetic"] == 4
    provenance = table.provenance
    assert provenance["ratio"] == "1:2" and provenance["clip_quantile"] == 0.9 and provenance["seed"] == 0
    assert provenance["synthetic_families"] == list(DEFAULT_MIX)
    assert any(source.startswith("harvest:") for source in provenance["sources"]["16x48"])
    assert len(list((tmp_path / "cache" / "harvest").glob("*.safetensors"))) == 1
    # Same inputs and seed: identical coefficients, in the next free version (never overwriting); the
    # second run reads the harvest and the spectra back from the cache.
    second = invoke([*TINY, "--out", str(tmp_path), "--name", "tiny", "--cache", str(tmp_path / "cache")])
    assert second.exit_code == 0, second.output
    assert second.output.strip().splitlines()[-1] == str(tmp_path / "tiny" / "v2.json")
    assert load_table(tmp_path / "tiny" / "v2.json").entry((16, 48)).coefficients == entry.coefficients
    # And ROOT trains with it.
    weight = torch.nn.Parameter(torch.randn(48, 16))
    weight.grad = torch.randn(48, 16)
    ROOT([weight], table=str(path), missing_shape="error").step()
    assert torch.isfinite(weight).all()


@pytest.mark.slow
def test_harvest_command_saves_samples_that_calibrate_reads_with_real(tmp_path):
    out_file = tmp_path / "momentum.safetensors"
    harvested = invoke(
        ["harvest", "--shapes", "16x48", "--count", "2", "--steps", "8", "--out", str(out_file), "--quiet"]
    )
    assert harvested.exit_code == 0, harvested.output
    assert harvested.output.strip().splitlines()[-1] == str(out_file)
    again = invoke(["harvest", "--shapes", "16x48", "--count", "2", "--out", str(out_file), "--quiet"])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    result = invoke([*TINY, "--real", str(out_file), "--out", str(tmp_path / "tables"), "--no-cache"])
    assert result.exit_code == 0, result.output
    table = load_table(Path(result.output.strip().splitlines()[-1]))
    assert table.provenance["real_sources"] == [str(out_file)]
    assert all("harvest:" not in s or str(out_file) in s for s in table.provenance["sources"]["16x48"])


def test_summary_and_last_line_without_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "summary", lambda results, name: "SUMMARY")
    result = invoke([a for a in TINY if a != "--quiet"] + ["--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "SUMMARY" in result.output and result.output.strip().splitlines()[-1].endswith("v1.json")
    assert json.loads(Path(result.output.strip().splitlines()[-1]).read_text())["name"] == "calibrated"


def test_default_command_is_calibrate():
    assert with_default_command(["--shapes", "1x2"]) == ["calibrate", "--shapes", "1x2"]
    assert with_default_command(["harvest", "--shapes", "1x2"]) == ["harvest", "--shapes", "1x2"]
    assert with_default_command(["--help"]) == ["--help"]
    assert re.match(r"root-calibrate", cli._command_line())


def test_model_weights_given_as_real_are_refused_with_how_to_mark_momentum(tmp_path):
    checkpoint = tmp_path / "hf-checkpoint"
    checkpoint.mkdir()
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 16)}, str(checkpoint / "model.safetensors")
    )
    result = invoke([*TINY, "--real", str(checkpoint), "--out", str(tmp_path / "tables"), "--no-cache"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    expected = (
        f"error: real momentum file {checkpoint / 'model.safetensors'} holds plain tensors not marked as"
    )
    assert len(lines) == 1 and lines[0].startswith(expected), result.output
    assert lines[0].endswith(", or pass --real-is-momentum")
    assert not (tmp_path / "tables").exists()


def test_real_text_file_says_what_is_wrong(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("i\n" * 100)
    result = invoke([*TINY, "--real", str(notes), "--out", str(tmp_path / "tables"), "--no-cache"])
    assert result.exit_code == 1, result.output
    message = f"error: cannot read real momentum file {notes}: not a safetensors or torch file (accepted: "
    assert result.output.strip().splitlines() == [
        message + "*.safetensors, or *.pt / *.pth / *.bin written by torch.save)"
    ]


def test_real_without_the_shape_warns_and_provenance_says_harvest(tmp_path):
    other_shape = tmp_path / "momentum"
    other_shape.mkdir()
    save_file(
        {"w": torch.randn(8, 8)}, str(other_shape / "m.safetensors"), metadata={"root_calibrate": "momentum"}
    )
    result = invoke([*TINY, "--real", str(other_shape), "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.output
    warning = (
        "warning: --real held no 16x48 tensor(s); 2 of its real samples were harvested instead "
        "(see provenance real_per_shape)"
    )
    assert warning in result.output.splitlines()
    provenance = load_table(Path(result.output.strip().splitlines()[-1])).provenance
    assert provenance["real_sources"] == ["harvest"]
    assert provenance["real_per_shape"] == {"16x48": {"files": 0, "harvest": 2}}


def rendered(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_summary_names_the_table_and_says_which_samples_each_column_averages():
    result = SimpleNamespace(
        key=(16, 48),
        validation={"calibrated": [0.1, 0.3, 0.2, 0.2], "muon": [0.4, 0.4, 0.4, 0.4]},
        matrix={
            "calibrated": {"float32": [0.1, 0.3], "bfloat16": [0.2, 0.3]},
            "muon": {"bfloat16": [0.5, 0.5]},
        },
        counts={"validation": 4, "matrix_checked": 2},
        fit=SimpleNamespace(safety=SimpleNamespace(high=1.1)),
        bound_for=lambda label: 1.1 if label == "calibrated" else None,
    )
    text = rendered(cli.summary([result], "mymodel"))
    cells = [line.replace("│", " ").split() for line in text.splitlines() if "16x48" in line]
    rows = {row[1]: row[2:] for row in cells}
    assert set(rows) == {"mymodel", "muon"} and "calibrated" not in text
    assert rows["mymodel"][:3] == ["0.2000", "0.2000", "0.2500"]
    caption = " ".join(text.split())
    assert (
        "spectral: float64 from the spectrum, over all 4 validation samples per shape; float32 / bf16: the "
        "real iteration, over the first 2 of them (--check-samples)"
    ) in caption


def test_real_is_momentum_takes_unmarked_tensors(tmp_path, monkeypatch):
    folder = tmp_path / "plain"
    folder.mkdir()
    save_file({"w": torch.randn(48, 16)}, str(folder / "tensors.safetensors"))
    loaded = []

    def load_then_stop(request, progress, team):
        loaded.append(pipeline.real_files(request))
        raise pipeline.CalibrationError("stopped after loading")

    monkeypatch.setattr(cli.ranks, "run", load_then_stop)
    result = invoke([*TINY, "--real", str(folder), "--real-is-momentum", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1 and "stopped after loading" in result.output, result.output
    assert [s.source for s in loaded[0][(16, 48)]] == [f"file:{folder / 'tensors.safetensors'}:w"]
