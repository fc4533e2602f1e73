"""Precision vs SVD: the numbers (calibrate.analysis.precision), the figures, the plot/report/show/list
commands."""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from typer.testing import CliRunner

from calibrate.analysis import plots, precision
from calibrate.analysis.plots import PLOT_SAMPLES_NOTE
from calibrate.analysis.report import SAMPLES_NOTE
from calibrate.cli import app, with_default_command
from calibrate.evaluate import matrix_errors, polar_factor
from calibrate.sampling.harvest import harvest, load_harvest, save_harvest
from calibrate.spectra import clipped
from root_core.tables import CoefficientTable, load_table, save_table

runner = CliRunner()
SHAPE = (16, 48)
SHAPE_TEXT = "16x48"
# Pixel size of every written PNG: FIGSIZE inches × DPI, fixed (no tight bounding box).
PNG_SIZE = (round(plots.FIGSIZE[1] * plots.DPI), round(plots.FIGSIZE[0] * plots.DPI))
# A short harvest: 12 training steps, recording after the 3-step warm-up (tests/test_harvest.py uses it too).
HARVEST_STEPS = 12
# The ROOT paper's 2048×2048 triple: its 5-step composition reaches 3.31 on (0, 1] (docs/design.md §1), and
# 8+ steps diverge; placed on the tiny test shape to exercise the off-scale and infinite-error paths.
SPIKY_ROW = (3.4916, -4.8224, 2.1095)


def invoke(args: list[str]):
    return runner.invoke(app, with_default_command(args))


@pytest.fixture(scope="module")
def harvest_file(tmp_path_factory) -> Path:
    samples = harvest(SHAPE, 4, seed=0, steps=HARVEST_STEPS)
    return save_harvest(samples, tmp_path_factory.mktemp("harvest") / "momentum.safetensors")


@pytest.fixture(scope="module")
def analysis(harvest_file) -> precision.Analysis:
    return precision.analyse(["polar-express"], against=["muon"], shapes=SHAPE_TEXT, source=str(harvest_file))


@pytest.fixture
def spiky_table(tmp_path) -> Path:
    table = CoefficientTable.create(
        name="spiky",
        default_rows=SPIKY_ROW,
        entries={SHAPE: {"coefficients": [SPIKY_ROW], "steps": 5, "metrics": {"max_gain": 1.3}}},
        provenance={"clip_quantile": 0.9},
    )
    return save_table(table, tmp_path / "tables")


# ---- the numbers ----------------------------------------------------------------------------------


def test_frame_has_every_shape_table_step_and_sample(analysis):
    frame = analysis.frame
    assert len(frame) == 2 * precision.MAX_STEPS * 4  # tables × steps × samples
    assert set(frame["table"]) == {"polar-express@1", "muon@1"}
    assert frame[precision.BF16].notna().all()  # every sample checked by default
    assert frame["train_step"].notna().all()  # a harvest is a training time series


def test_stepwise_bf16_equals_the_full_iteration(analysis):
    """bf16_errors_by_step at k is evaluate.matrix_errors of the k-step schedule, bit for bit."""
    item = analysis.shapes[0]
    schedule = load_table("polar-express").schedule_for(SHAPE)
    B = clipped(item.samples[0].matrix, item.clip_quantile)
    stepwise = precision.bf16_errors_by_step(B, polar_factor(B), schedule)
    for k in (1, 5, 7):
        full = matrix_errors(
            [item.samples[0].matrix],
            {"x": schedule.with_steps(k)},
            clip_quantile=item.clip_quantile,
            dtypes={"x": ("bfloat16",)},
        )
        assert stepwise[k - 1] == full["x"]["bfloat16"][0]


def test_plotted_numbers_equal_the_report(analysis):
    report = precision.report_frame(analysis).set_index("table")
    drawn = plots.plot_iterations(plots.new_figure(), analysis, SHAPE)
    native = drawn[drawn["native"]].set_index("table")
    for column in ("spectral_mean", "spectral_p95", "bf16_mean", "bf16_p95"):
        pd.testing.assert_series_equal(native[column], report[column], check_names=False)
    assert report.loc["polar-express@1", "ratio_vs_muon@1"] == pytest.approx(
        report.loc["polar-express@1", "spectral_mean"] / report.loc["muon@1", "spectral_mean"]
    )


def test_transfer_curve_stays_within_the_exact_bound(analysis):
    drawn = plots.plot_transfer(plots.new_figure(), analysis, SHAPE)
    report = precision.report_frame(analysis).set_index("table")
    for label, rows in drawn.groupby("table"):
        # The grid can only miss a spike, never exceed the exact range of composition_range.
        assert rows["P"].max() <= report.loc[label, "bound"] + 1e-12
        assert rows["sigma"].min() == pytest.approx(precision.TRANSFER_SIGMA_MIN)
        assert rows["sigma"].max() == 1.0


def test_training_figure_averages_the_samples_of_each_step(analysis, harvest_file):
    drawn = plots.plot_training(plots.new_figure(), analysis, SHAPE)
    frame = analysis.frame
    native = frame[frame["native"]]
    # The harvest's samples by training step: at the early step two probes' runs record one each.
    steps = [sample.meta["step"] for sample in load_harvest(harvest_file)]
    assert max(steps.count(step) for step in steps) == 2
    for row in drawn.itertuples():
        same = native[(native["table"] == row.table) & (native["train_step"] == row.train_step)]
        assert len(same) == steps.count(row.train_step)
        assert row.spectral == pytest.approx(same["spectral"].mean())


def test_synthetic_samples_have_no_training_figure():
    analysis = precision.analyse(["muon"], against=[], shapes=SHAPE_TEXT, count=2)
    assert plots.figure_kinds(analysis, SHAPE) == ["iterations", "transfer", "flops"]
    with pytest.raises(precision.CalibrationError, match=re.escape("carry no training step")):
        precision.training_frame(analysis, SHAPE)


def test_diverging_table_reports_infinite_errors_not_missing_ones(spiky_table, tmp_path):
    analysis = precision.analyse([str(spiky_table)], against=["muon"], shapes=SHAPE_TEXT, count=3)
    summary = precision.summarize(analysis.frame)
    spiky = summary[summary["table"] == "spiky@1"].set_index("steps")
    # Diverged: astronomically large or overflowed to inf (which sample overflows depends on the synthetic
    # mix), and never NaN, which would drop the row from the plots.
    assert spiky.loc[precision.MAX_STEPS, "spectral_mean"] > 1e100
    assert not spiky[["spectral_mean", "bf16_mean", "spectral_p95", "bf16_p95"]].isna().any().any()
    report = precision.report_frame(analysis).set_index("table")
    assert report.loc["spiky@1", "bound"] == pytest.approx(3.31, abs=0.01)  # docs/design.md §1
    assert report.loc["spiky@1", "max_gain"] == 1.3 and report.loc["muon@1", "max_gain"] == 1.25
    paths = plots.write_figures(analysis, tmp_path / "figures")
    assert [p.name for p in paths] == [
        f"precision_{SHAPE_TEXT}_iterations.png",
        f"precision_{SHAPE_TEXT}_transfer.png",
        f"precision_{SHAPE_TEXT}_flops.png",
    ]


def test_clip_quantile_comes_from_the_table(tmp_path):
    table = CoefficientTable.create(
        name="unclipped",
        default_rows=SPIKY_ROW,
        entries={SHAPE: [SPIKY_ROW]},
        provenance={"clip_quantile": None},
    )
    path = save_table(table, tmp_path)
    analysis = precision.analyse([str(path)], against=[], count=1, check_samples=0)
    assert analysis.shapes[0].clip_quantile is None
    assert precision.analyse(["muon"], against=[], shapes=SHAPE_TEXT, count=1).shapes[0].clip_quantile == 0.9


def test_a_failed_render_leaves_no_file(analysis, tmp_path, monkeypatch):
    def broken(fig, analysis, shape):
        raise RuntimeError("render failed")

    monkeypatch.setitem(plots.PLOTTERS, "training", broken)
    out = tmp_path / "figures"
    with pytest.raises(RuntimeError, match="render failed"):
        plots.write_figures(analysis, out)
    assert not out.exists()


# ---- the commands ---------------------------------------------------------------------------------


def test_plot_writes_four_real_images(tmp_path):
    out = tmp_path / "figures"
    result = invoke(
        [
            *("plot", "polar-express", "--shapes", SHAPE_TEXT, "--samples", "harvest", "--count", "4"),
            *("--harvest-steps", str(HARVEST_STEPS), "--against", "muon", "--out", str(out), "--quiet"),
        ]
    )
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.output.strip().splitlines()]
    assert [p.name for p in printed] == [f"precision_{SHAPE_TEXT}_{kind}.png" for kind in plots.KINDS]
    for path in printed:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[:2] == PNG_SIZE
    assert sorted(out.iterdir()) == sorted(printed)  # no temporary file left behind


@pytest.mark.parametrize(("fmt", "magic"), [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_plot_vector_formats(fmt, magic, tmp_path):
    result = invoke(
        [
            *("plot", "muon", "--shapes", SHAPE_TEXT, "--count", "2", "--against", "none"),
            *("--out", str(tmp_path), "--format", fmt, "--quiet"),
        ]
    )
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.output.strip().splitlines()]
    assert len(paths) == 3 and all(p.suffix == f".{fmt}" and p.read_bytes().startswith(magic) for p in paths)


def test_report_formats_agree(harvest_file):
    common = ["report", "polar-express", "--shapes", SHAPE_TEXT, "--against", "muon", "--count", "3"]
    common += ["--samples", str(harvest_file), "--quiet", "--format"]
    outputs = {}
    for fmt in ("csv", "json", "markdown", "table"):
        result = invoke([*common, fmt])
        assert result.exit_code == 0, result.output
        outputs[fmt] = result.output
    frame = pd.read_csv(StringIO(outputs["csv"]))
    records = json.loads(outputs["json"])
    assert list(frame["table"]) == [r["table"] for r in records] == ["polar-express@1", "muon@1"]
    assert np.allclose(frame["spectral_mean"], [r["spectral_mean"] for r in records])
    assert outputs["markdown"].splitlines()[0].startswith("| shape | table | steps | spectral_mean")
    assert "Relative error vs the exact polar factor (SVD)" in outputs["table"]
    # Every format says which samples the numbers are on, and that they are not the calibration's.
    described = f"shape {SHAPE_TEXT} · 3 samples from {harvest_file}"
    assert frame["samples"].str.startswith(described).all() and records[0]["samples"] == frame["samples"][0]
    for fmt in ("markdown", "table"):
        assert f"samples: {described}" in outputs[fmt] and SAMPLES_NOTE in outputs[fmt]


def test_figures_say_they_are_not_on_the_calibration_samples(analysis):
    fig = plots.new_figure()
    plots.plot_iterations(fig, analysis, SHAPE)
    assert fig.get_supxlabel().endswith(PLOT_SAMPLES_NOTE)


def test_show_and_list(spiky_table, monkeypatch):
    shown = invoke(["show", str(spiky_table)])
    assert shown.exit_code == 0, shown.output
    assert "spiky@1" in shown.output and "16x48  (5 steps)" in shown.output
    assert "metrics.max_gain: 1.3" in shown.output and "clip_quantile: 0.9" in shown.output
    monkeypatch.setenv("ROOT_COEFF_TABLES", str(spiky_table.parent.parent))
    listed = invoke(["list"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert {"muon", "polar-express", "root-paper", "spiky"} <= set(rows)
    assert "bundled" in rows["muon"] and str(spiky_table.parent.parent) in rows["spiky"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plot", "nope"], "unknown table 'nope': no coefficient table named 'nope'"),
        (["report", "muon", "--shapes", SHAPE_TEXT, "--against", "nope"], "unknown baseline 'nope'"),
        (
            ["plot", "root-paper", "--shapes", SHAPE_TEXT],
            "shape 16x48 is not in table root-paper@1 (it lists 2048x2048, 2048x3072, 2048x8192, 2048x16384)",
        ),
        (["plot", "muon"], "table muon@1 lists no shapes; pass --shapes"),
        (["plot", "muon", "--shapes", "16x"], "invalid shape '16x'"),
        (["plot", "muon", "--shapes", SHAPE_TEXT, "--format", "gif"], "invalid --format 'gif'"),
        (["report", "muon", "--shapes", SHAPE_TEXT, "--format", "xml"], "invalid --format 'xml'"),
        (["plot", "muon", "--shapes", SHAPE_TEXT, "--count", "0"], "invalid --count 0"),
        (
            ["plot", "muon", "--shapes", SHAPE_TEXT, "--samples", "no/such.pt"],
            "invalid --samples 'no/such.pt'",
        ),
        (["show", "muon@9"], "unknown table 'muon@9': table 'muon' has no version 9"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "load_samples", lambda *a, **k: pytest.fail("work started on bad input"))
    out = tmp_path / "figures"
    result = invoke([*args, "--out", str(out)] if args[0] == "plot" else args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.match("error: .*" + re.escape(message), lines[0]), result.output
    assert not out.exists()


def test_help_shows_examples():
    for command in ("plot", "report", "show", "list"):
        result = invoke([command, "--help"])
        assert result.exit_code == 0, result.output
        assert f"root-calibrate {command}" in result.output or "ROOT_COEFF_TABLES" in result.output


def test_transfer_legend_sits_outside_the_axes_and_p_is_clipped_above_the_bound(spiky_table):
    analysis = precision.analyse([str(spiky_table)], against=["muon"], shapes=SHAPE_TEXT, count=2)
    fig = plots.new_figure()
    plots.plot_transfer(fig, analysis, SHAPE)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    top = fig.axes[0]
    # The legend never hides a curve or the bound line: it is beside the axes, not on them.
    assert not top.get_legend().get_window_extent(renderer).overlaps(top.get_window_extent(renderer))
    # Linear P up to just above the bound (the spiky table's max_gain, 1.3); its 3.3 spike is named.
    assert top.get_yscale() == "linear"
    assert top.get_ylim()[1] == pytest.approx(plots.TRANSFER_HEADROOM * 1.3)
    assert top.get_title().startswith("off scale (P > 1.37): spiky@1 (up to 3.")
