"""--steps auto (issue 14): targets, the choice of k from a frontier, FLOPs, the table's record, ROOT's
per-shape step counts, and the CLI's one-line errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHAPES
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from calibrate.analysis import plots
from calibrate.cli import app, with_default_command
from calibrate.errors import CalibrationError
from calibrate.fitting import pipeline
from calibrate.fitting.fit import FitResult
from calibrate.fitting.objective import mean_error, safety
from calibrate.fitting.steps import (
    MAX_AUTO_STEPS,
    FrontierPoint,
    Target,
    TargetLevels,
    choose_steps,
    ns_matmul_flops,
    parse_steps,
    parse_target,
    steps_to_reach,
    target_levels,
)
from root_core import ROOT, CoefficientTable, load_table, orthogonalize, save_table
from root_core.schedule import Schedule

runner = CliRunner()
MUON_ROW = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's default triple (docs/design.md §2)


def invoke(args: list[str]):
    return runner.invoke(app, with_default_command(args))


# ---- targets and --steps --------------------------------------------------------------------------


def test_targets_parse_to_a_number_or_a_named_set():
    assert parse_target("0.1") == Target(text="0.1", value=0.1)
    assert parse_target(" Polar-Express ") == Target(text="polar-express", reference="polar-express")
    assert parse_target("muon").reference == "muon"
    assert parse_steps("auto") is None and parse_steps("7") == 7


@pytest.mark.parametrize("text", ["fast", "0", "1", "1.5", "-0.1", "nan", "inf", ""])
def test_a_bad_target_names_the_value(text):
    with pytest.raises(CalibrationError, match=re.escape(f"invalid --target '{text}': expected a relative")):
        parse_target(text)


@pytest.mark.parametrize("text", ["0", "11", "abc", "2.5", "-3"])
def test_bad_steps_name_the_value(text):
    with pytest.raises(CalibrationError, match=re.escape(f"invalid --steps '{text}': expected an integer")):
        parse_steps(text)


# ---- the choice of k ------------------------------------------------------------------------------


def point(steps, validation, **stress):
    return FrontierPoint(steps=steps, validation_error=validation, stress_errors=stress)


def test_the_fewest_steps_that_reach_the_target_are_chosen():
    frontier = [point(2, 0.5), point(3, 0.2), point(4, 0.09), point(5, 0.05)]
    assert choose_steps(frontier, TargetLevels(validation=0.1)) == 4
    assert choose_steps(frontier, TargetLevels(validation=0.2)) == 3  # equal counts as reached
    assert choose_steps(frontier, TargetLevels(validation=0.01)) is None  # out of reach: no k


def test_a_stress_set_above_its_level_rules_a_k_out():
    frontier = [point(3, 0.08, tail=0.6), point(4, 0.07, tail=0.4), point(5, 0.06, tail=0.3)]
    levels = TargetLevels(validation=0.1, stress={"tail": 0.45})
    assert choose_steps(frontier, levels) == 4
    # A stress set the point did not measure cannot count as reached.
    assert not point(4, 0.07).reaches(levels)
    # Without the robust fit there are no stress levels: validation alone decides.
    assert choose_steps(frontier, TargetLevels(validation=0.1)) == 3


def test_target_levels_from_a_number_or_a_named_set():
    validation = {"polar-express": 0.09, "muon": 0.2}
    stress = {"polar-express": {"tail": 0.35, "low": 0.05}, "muon": {"tail": 0.5, "low": 0.6}}
    by_number = target_levels(parse_target("0.1"), validation, stress, "polar-express")
    # The number on validation; on a stress set the larger of the number and Polar Express's 5-step error.
    assert by_number == TargetLevels(validation=0.1, stress={"tail": 0.35, "low": 0.1})
    by_muon = target_levels(parse_target("muon"), validation, stress, "polar-express")
    assert by_muon == TargetLevels(validation=0.2, stress={"tail": 0.5, "low": 0.6})
    assert target_levels(parse_target("0.1"), validation, {}, "polar-express").stress == {}


def test_an_absolute_target_must_hold_on_real_momentum_too():
    # The 896x4864 case of benchmarks/RESULTS.md: 5 steps reach 0.1 on the mixed validation but not on
    # the real momentum samples; 6 steps reach both.
    frontier = [
        FrontierPoint(steps=5, validation_error=0.089, real_error=0.128),
        FrontierPoint(steps=6, validation_error=0.020, real_error=0.043),
    ]
    levels = target_levels(parse_target("0.1"), {"polar-express": 0.09}, {}, "polar-express", has_real=True)
    assert levels == TargetLevels(validation=0.1, real=0.1)
    assert choose_steps(frontier, levels) == 6
    # Without real samples (--ratio 0:1) the level is absent and validation decides.
    assert choose_steps(frontier, TargetLevels(validation=0.1)) == 5
    # A point that did not measure real momentum cannot count as reaching a real level.
    assert not FrontierPoint(steps=6, validation_error=0.02).reaches(levels)


def test_a_named_target_sets_no_real_momentum_level():
    validation = {"polar-express": 0.09, "muon": 0.2}
    levels = target_levels(parse_target("polar-express"), validation, {}, "polar-express", has_real=True)
    assert levels.real is None


def test_steps_to_reach_reads_a_baseline_frontier():
    assert steps_to_reach({5: 0.1, 6: 0.08, 7: 0.05}, 0.09) == 6
    assert steps_to_reach({5: 0.1, 6: 0.08}, 0.01) is None


# ---- FLOPs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [1, 3])
def test_the_flops_formula_counts_what_orthogonalize_multiplies(shape, steps):
    """torch's own FLOP counter over a real call: the formula is per matrix, so a batch is its count
    times the formula; tall and wide inputs cost the same (the tall one runs transposed)."""
    schedule = Schedule(rows=((3.4445, -4.7750, 2.0315),), steps=steps)
    with FlopCounterMode(display=False) as counter:
        orthogonalize(torch.randn(*shape), schedule)
    batch = math.prod(shape[:-2])
    assert counter.get_total_flops() == batch * ns_matmul_flops(shape[-2:], steps)


# ---- the fallback at the same step count --------------------------------------------------------


def fit_result(schedule: Schedule) -> FitResult:
    return FitResult(
        schedule=schedule,
        calibration_error=0.0,
        safety=safety(schedule),
        start_errors={},
        evaluations=0,
        seconds=0.0,
        method={"form": "per-step"},
    )


def test_fitted_rows_that_lose_to_polar_express_at_their_step_count_are_replaced_by_it():
    """Polar Express extended to 3 steps, not its 5-step rows, is what 3 fitted steps must beat."""
    spectra = torch.linspace(1e-3, 1.0, 64, dtype=torch.float64).repeat(2, 1)
    spectra = spectra / spectra.norm(dim=-1, keepdim=True)
    losing = Schedule(rows=((1.5, -0.5, 0.0),) * 3, steps=3)  # barely moves small σ
    shipped, rows = pipeline.shipped_at(fit_result(losing), "polar-express", spectra, keep_fitted=False)
    assert shipped == "polar-express" and rows == pipeline.baseline_rows("polar-express", 3)
    assert rows.num_steps == 3
    assert pipeline.shipped_at(fit_result(losing), "polar-express", spectra, keep_fitted=True)[1] is losing
    schedules = pipeline.check_schedules((16, 48), fit_result(losing))
    assert schedules["polar-express (3 steps)"] == rows
    assert mean_error(spectra, schedules["polar-express (3 steps)"]) < mean_error(spectra, losing)


def test_the_fallback_check_compares_with_polar_express_at_the_fitted_count(tmp_path):
    """3 fitted steps that lose to Polar Express's 5 but beat its 3 ship; losing to its 3 falls back."""
    fitted = fit_result(Schedule(rows=((1.5, -0.5, 0.0),) * 3, steps=3))
    request = pipeline.CalibrationRequest(shapes=[(16, 48)], out=tmp_path, name="x")
    spectral = {"calibrated": [0.5], "polar-express": [0.1], "polar-express (3 steps)": [0.6]}
    assert pipeline.baseline_check(fitted, spectral, {}, request) is None
    spectral["polar-express (3 steps)"] = [0.4]
    fallback = pipeline.baseline_check(fitted, spectral, {}, request)
    assert fallback["to"] == "polar-express" and fallback["steps"] == 3
    assert fallback["reason"] == "validation spectral error 0.5000 > 0.4000"


def test_each_k_also_starts_from_the_previous_ks_rows_in_its_own_form():
    shared = fit_result(Schedule(rows=(MUON_ROW,), steps=3))
    assert pipeline.previous_start(shared, 4, shared=True) == {
        "auto:previous k": Schedule(rows=(MUON_ROW,), steps=4)
    }
    per_step = pipeline.previous_start(fit_result(Schedule(rows=(MUON_ROW,) * 3, steps=3)), 4, shared=False)
    assert len(per_step["auto:previous k"].rows) == 4  # three fitted rows and their continuation
    assert pipeline.previous_start(None, 2, shared=False) is None


# ---- ROOT runs each shape's own count; ns_steps overrides ---------------------------------------


def test_root_runs_each_shapes_own_step_count_and_ns_steps_overrides_it():
    three = ((2.0, -1.5, 0.5), (1.8, -1.2, 0.4), (1.6, -0.9, 0.3))
    seven = tuple((1.5 + 0.05 * k, -0.6, 0.1) for k in range(7))
    table = CoefficientTable.create(
        name="auto",
        default_rows=(3.4445, -4.7750, 2.0315),
        entries={(16, 48): {"coefficients": three, "steps": 3}, (24, 24): {"coefficients": seven}},
    )
    wide, square = torch.randn(16, 48), torch.randn(24, 24)

    def updates(**kwargs):
        params = [torch.nn.Parameter(torch.zeros(16, 48)), torch.nn.Parameter(torch.zeros(24, 24))]
        params[0].grad, params[1].grad = wide.clone(), square.clone()
        options = dict(lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, outlier_quantile=None)
        ROOT(params, table=table, adjust_lr_fn="original", **options, **kwargs).step()
        return [-p.detach() for p in params]

    def expected(grad, rows, steps):
        return orthogonalize(grad, Schedule(rows=rows, steps=len(rows)).with_steps(steps), eps=1e-7)

    own = updates()
    torch.testing.assert_close(own[0], expected(wide, three, 3))
    torch.testing.assert_close(own[1], expected(square, seven, 7))
    assert not torch.allclose(own[0], expected(wide, three, 2))  # the count matters at this tolerance
    override = updates(ns_steps=4)
    torch.testing.assert_close(override[0], expected(wide, three, 4))
    torch.testing.assert_close(override[1], expected(square, seven, 4))


# ---- the CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "auto", "--target", "fast"], "invalid --target 'fast': expected a relative error"),
        (["--steps", "auto", "--target", "1.5"], "invalid --target '1.5'"),
        (["--steps", "auto", "--target", "-0.1"], "invalid --target '-0.1'"),
        (["--steps", "0"], "invalid --steps '0': expected an integer in [1, 10] or 'auto'"),
        (["--steps", "11"], "invalid --steps '11': expected an integer in [1, 10] or 'auto'"),
        (["--steps", "abc"], "invalid --steps 'abc': expected an integer in [1, 10] or 'auto'"),
        (["--steps", "5", "--target", "0.1"], "--target '0.1' needs --steps auto (got --steps 5)"),
        (["--target", "muon"], "--target 'muon' needs --steps auto (got --steps 5)"),
    ],
)
def test_bad_step_options_fail_with_one_line_and_no_file(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("long work started on bad input"))
    result = invoke(["--shapes", "16x48", *args, "--out", str(tmp_path / "tables"), "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: .*", lines[0]), result.output
    assert re.search(re.escape(message), lines[0]), lines[0]
    assert not (tmp_path / "tables").exists()


@pytest.mark.slow
def test_a_tiny_auto_run_records_the_frontier_and_the_chosen_count_root_runs(tmp_path):
    args = ["--shapes", "16x48", "--samples", "8", "--ratio", "0:1", "--iterations", "8", "--quiet"]
    out = ["--out", str(tmp_path), "--name", "tiny-auto", "--no-cache", "--check-samples", "1"]
    result = invoke([*args, *out, "--steps", "auto", "--target", "0.3"])
    assert result.exit_code == 0, result.output
    table = load_table(Path(result.output.strip().splitlines()[-1]))
    entry = table.entry((16, 48))
    search = entry.metrics["steps_search"]
    steps = search["chosen_steps"]
    assert search["target"] == "0.3" and search["reached"] and 2 <= steps <= MAX_AUTO_STEPS
    assert entry.steps == steps == entry.metrics["steps"] == table.schedule_for((16, 48)).num_steps
    assert entry.metrics["flops_per_call"] == ns_matmul_flops((16, 48), steps)
    frontier = search["frontier"]
    # Fitted in increasing k, stopped at the first that reaches the target; every earlier k misses it.
    assert [p["steps"] for p in frontier] == list(range(2, steps + 1))
    assert [p["reaches_target"] for p in frontier] == [False] * (steps - 2) + [True]
    assert all(p["flops"] == ns_matmul_flops((16, 48), p["steps"]) for p in frontier)
    assert frontier[-1]["validation_error"] <= 0.3 and all(p["bound"] <= 1.25 for p in frontier)
    assert set(search["baselines_by_steps"]) == {"polar-express", "muon"}
    assert table.provenance["steps"] == "auto" and table.provenance["target"] == "0.3"
    assert f"16x48: {steps} steps reach the target" in result.output


def test_an_absolute_target_is_checked_on_the_real_momentum_of_a_tiny_run(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # Real momentum with a deep small-σ tail: rank 4 over noise 1e-4 smaller, harder than the synthetic mix.
    matrices = {
        f"layers.{i}.w": torch.randn(48, 4, generator=generator) @ torch.randn(4, 16, generator=generator)
        + 1e-4 * torch.randn(48, 16, generator=generator)
        for i in range(4)
    }
    momentum = tmp_path / "run.momentum.pt"
    torch.save(matrices, momentum)
    args = ["--shapes", "16x48", "--samples", "8", "--ratio", "1:1", "--iterations", "8", "--quiet"]
    out = ["--out", str(tmp_path), "--name", "real-auto", "--no-cache", "--check-samples", "1"]
    result = invoke([*args, *out, "--real", str(momentum), "--steps", "auto", "--target", "0.2"])
    assert result.exit_code == 0, result.output
    search = load_table(Path(result.output.strip().splitlines()[-1])).entry((16, 48)).metrics["steps_search"]
    assert search["target_real_momentum_error"] == 0.2
    for point in search["frontier"]:
        assert point["reaches_target"] == (
            point["validation_error"] <= 0.2 + 1e-9
            and point["real_momentum_error"] <= 0.2 + 1e-9
            and all(e <= search["target_stress_errors"][n] + 1e-9 for n, e in point["stress_errors"].items())
        )


# ---- the frontier in plot and report ------------------------------------------------------------


@pytest.fixture
def auto_table(tmp_path) -> Path:
    """A hand-made auto table at 16x48: a frontier at k = 2, 3 (Muon's triple), 3 chosen, target muon."""
    frontier = [
        {"steps": k, "validation_error": 0.5 / k, "coefficients": [list(MUON_ROW)] * k} for k in (2, 3)
    ]
    metrics = {"steps_search": {"target": "muon", "chosen_steps": 3, "frontier": frontier}}
    table = CoefficientTable.create(
        name="hand-auto",
        default_rows=MUON_ROW,
        entries={(16, 48): {"coefficients": [MUON_ROW] * 3, "steps": 3, "metrics": metrics}},
        provenance={"clip_quantile": 0.9},
    )
    return save_table(table, tmp_path / "tables")


def test_the_frontier_frame_has_every_set_at_its_counts_with_flops_and_errors(auto_table):
    from calibrate.analysis import frontier, precision

    analysis = precision.analyse([str(auto_table)], against=[], shapes="16x48", count=2, check_samples=0)
    frame = frontier.frontier_frame(analysis, (16, 48))
    counts = frame.groupby("table", sort=False)["steps"].apply(list).to_dict()
    assert counts == {
        "muon": [5],
        "polar-express": [5, 6, 7, 8, 9, 10],
        "you-6step": [6],
        "hand-auto@1": [2, 3],
    }
    assert (frame["flops"] == [ns_matmul_flops((16, 48), k) for k in frame["steps"]]).all()
    spectra = analysis.samples_for((16, 48)).spectra
    ours = frame[frame["table"] == "hand-auto@1"].set_index("steps")
    for k in (2, 3):
        expected = mean_error(spectra, Schedule(rows=(MUON_ROW,) * k, steps=k))
        assert ours.loc[k, "spectral_mean"] == pytest.approx(expected, rel=1e-12)
    assert ours["native"].tolist() == [False, True]  # the chosen k
    muon_error = mean_error(spectra, load_table("muon").default_schedule)
    assert frontier.target_levels(analysis, (16, 48)) == {
        "hand-auto@1 target: muon": pytest.approx(muon_error)
    }
    drawn = plots.plot_flops(plots.new_figure(), analysis, (16, 48))
    pd.testing.assert_frame_equal(drawn, frame)


def test_report_prints_the_frontier_under_its_table(auto_table):
    result = invoke(["report", str(auto_table), "--against", "none", "--count", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    section = result.output.split("Error vs cost")[1]
    rows = [line.split() for line in section.splitlines() if line.strip().startswith("16x48 ")]
    assert [row[2] for row in rows if row[1] == "hand-auto@1"] == ["2", "3"]
    assert [row[2] for row in rows if row[1] == "polar-express"] == [str(k) for k in range(5, 11)]
    assert re.search(r"16x48: hand-auto@1 target: muon = [0-9.]+ on these samples", section)
    csv = invoke(
        ["report", str(auto_table), "--against", "none", "--count", "2", "--quiet", "--format", "csv"]
    )
    assert csv.exit_code == 0 and "Error vs cost" not in csv.output  # csv stays one table


# ---- the benchmark --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("independent_set", ["1", "2"])
def test_auto_steps_benchmark_reports_every_k_on_independent_momentum(tmp_path, independent_set):
    from conftest import run_benchmark

    cache = str(tmp_path / "cache")
    args = [
        "--independent-set",
        independent_set,
        "--shapes",
        "16x48",
        "--target",
        "0.1",
        "--iterations",
        "8",
        "--independent-count",
        "2",
        "--samples",
        "6",
    ]
    args += ["--steps", "8", "--harvest-steps", "12", "--cache", cache, "--held-out-cache", cache]
    result = run_benchmark("auto_steps.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    summary = [line for line in lines if line.startswith("| 16x48 |") and line.count("|") == 12]
    frontier = [line for line in lines if line.startswith("| 16x48 |") and line.count("|") == 11]
    assert len(summary) == 1 and [line.split(" | ")[1] for line in frontier] == [str(k) for k in range(2, 11)]
    # 16x48 is 3× as long as wide: the MLP check applies (met or missed, never "—").
    assert summary[0].rstrip(" |").split(" | ")[-1] in ("met", "**missed**")
    assert f"independent held-out matrices per shape (precision.py's set {independent_set})" in result.stdout
    folder = "held-out-harvest" if independent_set == "1" else "held-out-harvest-2"
    assert len(list((tmp_path / "cache" / folder).iterdir())) == 1
