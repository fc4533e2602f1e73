"""benchmarks/train_compare.py runs end to end at a tiny size, and rejects bad input with one line."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest
from conftest import run_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_compare.py"
ARMS = ("AdamW", "Muon", "ROOT root-paper", "ROOT calibrated", "ROOT calibrated (no threshold)")
# A model and a calibration small enough for seconds, not minutes (the defaults take ~20 min).
TINY = [
    *("--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch", "4"),
    *("--steps", "4", "--seeds", "2", "--lrs", "0.004,0.008", "--val-sequences", "4"),
    *("--corpus-bytes", "200000", "--evals", "2"),
    *("--calib-samples", "6", "--calib-iterations", "4", "--calib-harvest-steps", "12"),
]


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_benchmark("train_compare.py", *args, cwd=cwd)


@pytest.mark.slow
def test_train_compare_smoke(tmp_path):
    plot = tmp_path / "curves.png"
    result = run_script(*TINY, "--calib-cache", str(tmp_path / "cache"), "--plot", str(plot), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for variant in ("clean", "noisy"):
        for arm in ARMS:
            assert f"| {variant} | {arm} | 0.00" in out, (variant, arm, out)
    # The calibrated arms ran on a table fitted for exactly the model's shapes (16×16 attention, 16×48 MLP).
    assert "root-calibrate --shapes 16x16,16x48" in out
    assert "Δ final vs Muon, paired by seed" in out and "| lr 0.004 | lr 0.008 |" in out
    assert plot.stat().st_size > 0


@pytest.fixture
def train_compare(monkeypatch):
    """The script as a module (it imports its sibling ``results`` the way scripts do)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("train_compare")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lrs", "fast"], "--lrs 'fast': expected comma-separated numbers"),
        (["--arms", "SGD"], "--arms: unknown ['SGD']"),
        (["--d-model", "10", "--heads", "4"], "--d-model 10 must split into --heads 4"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_bad_input_fails_with_one_line(train_compare, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        train_compare.parse_args(args)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_every_run_evaluates_at_the_reported_fractions(train_compare):
    assert train_compare.eval_steps(200, 8) == [25, 50, 75, 100, 125, 150, 175, 200]
    assert train_compare.eval_steps(6, 2) == [2, 3, 6]  # 25% and 50% added to the even spacing
    assert train_compare.eval_steps(100, 0) == [100]  # sweep runs: the final loss only


def test_noise_is_the_same_for_every_arm_and_heavy_tailed(train_compare):
    import torch

    def noisy_grads(seed: int, step: int) -> list[torch.Tensor]:
        layer = torch.nn.Linear(64, 64)
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        train_compare.inject_noise(layer, train_compare.Noise(prob=1.0, scale=1.0, alpha=1.5), seed, step)
        return [p.grad for p in layer.parameters()]

    first, again, other = noisy_grads(1, 7), noisy_grads(1, 7), noisy_grads(2, 7)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    noise = (first[0] - 1).abs()
    assert noise.max() > 50 * noise.median()  # a few entries spike: what the soft-threshold clips


# ---------------------------------------------------------------- issue 14: auto-step and exact-polar arms

MUON_ROW = (3.4445, -4.7750, 2.0315)
CLASSIC_ROW = (1.875, -1.25, 0.375)
# A float64 SVD and a float64 eigendecomposition of the Gram matrix are both backward stable: on these
# well-conditioned Gaussian matrices (σ_max/σ_min < 20) their polar factors agree to ~1e-14; 1e-10
# leaves room while still failing for any Newton–Schulz approximation (errors ≥ 1e-3 after 5 steps).
EXACT_POLAR_TOLERANCE = 1e-10


def hand_auto_table(tmp_path: Path, shapes_rows: dict) -> Path:
    """An auto-step table made by hand: each entry's step count is its number of rows."""
    from root_core.tables import CoefficientTable, save_table

    table = CoefficientTable.create(name="hand-auto", default_rows=MUON_ROW, entries=shapes_rows)
    return save_table(table, tmp_path)


def reference_polar(B):
    """U Vᵀ in float64 from the short side's Gram matrix: (B Bᵀ)^(−1/2) B, independent of any SVD."""
    import torch

    wide = B.shape[-2] <= B.shape[-1]
    X = (B if wide else B.mT).to(torch.float64)
    eigenvalues, U = torch.linalg.eigh(X @ X.mT)
    polar = (U * eigenvalues.rsqrt().unsqueeze(-2)) @ U.mT @ X
    return polar if wide else polar.mT


@pytest.mark.parametrize("quantile", [None, 0.9])
def test_exact_polar_arm_steps_along_u_vt(train_compare, quantile):
    """The SVD arm's update is U Vᵀ of the clipped momentum: wide, tall, square and a same-shape batch."""
    import torch

    from root_core.outliers import clip_to_quantile

    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 40), (40, 16), (24, 24), (12, 20), (12, 20)]  # the last two step as one (2, 12, 20) batch
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in shapes]
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer = train_compare.ExactPolarROOT(
        params, lr=0.1, weight_decay=0.0, outlier_quantile=quantile, svd_dtype=torch.float64
    )
    optimizer.step()
    for p, g in zip(params, grads, strict=True):
        # The first Nesterov update is (1 − μ²)·g, a positive multiple: the same clip and polar factor.
        B = g if quantile is None else clip_to_quantile(g, quantile)
        step = 0.1 * max(1.0, p.shape[0] / p.shape[1]) ** 0.5  # ROOT's default ("original") lr rule
        error = (p.detach() / -step - reference_polar(B)).norm() / reference_polar(B).norm()
        assert error < EXACT_POLAR_TOLERANCE, (tuple(p.shape), float(error))


def test_exact_polar_zeroes_null_directions(train_compare):
    """A rank-deficient update keeps only its range (as NS does), and a zero update makes no step."""
    import torch

    generator = torch.Generator().manual_seed(1)
    left, right = torch.randn(16, 2, generator=generator), torch.randn(2, 24, generator=generator)
    direction = train_compare.exact_polar(left @ right, torch.float64)
    singular_values = torch.linalg.svdvals(direction.double())
    assert torch.allclose(singular_values[:2], torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert singular_values[2:].max() < 1e-5
    assert torch.equal(train_compare.exact_polar(torch.zeros(8, 12), torch.float64), torch.zeros(8, 12))


def tiny_context(train_compare, tmp_path: Path, *extra: str):
    args = train_compare.parse_args([*TINY[: TINY.index("--calib-samples")], "--no-noisy", *extra])
    import torch

    cfg = train_compare.ModelConfig(args.d_model, args.layers, args.heads, args.d_ff, args.seq_len)
    shapes = train_compare.matrix_shapes(train_compare.ByteLM(cfg))
    tables, lines = train_compare.arm_tables(shapes, args)
    data = train_compare.load_data(args)
    ctx = train_compare.Context(cfg, data, args.batch, torch.device("cpu"), torch.float32, tables)
    return args, ctx, lines


def test_auto_arm_runs_each_shapes_own_step_count(train_compare, tmp_path):
    """16×48 has two rows in the table, so the auto arm's step there is two NS steps, not five."""
    import torch

    from root_core import orthogonalize
    from root_core.outliers import clip_to_quantile
    from root_core.schedule import Schedule

    rows = {(16, 16): [MUON_ROW] * 3, (16, 48): [MUON_ROW, CLASSIC_ROW]}
    table = hand_auto_table(tmp_path, rows)
    _, ctx, lines = tiny_context(
        train_compare, tmp_path, "--arms", "ROOT auto-steps", "--auto-table", str(table)
    )
    assert any(
        "16×16: 3 steps (0.60× the FLOPs of 5); 16×48: 2 steps (0.40× the FLOPs of 5)" in line
        for line in lines
    )
    torch.manual_seed(0)
    model = train_compare.ByteLM(ctx.model_cfg)
    down = model.blocks[0].down.weight  # 16×48, the only matrix of its shape and orientation
    before = down.detach().clone()
    optimizer = train_compare.make_optimizer("ROOT auto-steps", model, 0.01, ctx)
    train_compare.lm_loss(
        model, train_compare.get_batch(ctx.data, torch.arange(4) * 97, 16, ctx.device)
    ).backward()
    grad = down.grad.clone()
    optimizer.step()
    B = clip_to_quantile(grad, 0.9)  # the first update is a positive multiple of the gradient
    two_steps = orthogonalize(B, Schedule(rows=(MUON_ROW, CLASSIC_ROW)), dtype=torch.float32)
    five_steps = orthogonalize(B, Schedule(rows=(MUON_ROW, CLASSIC_ROW), steps=5), dtype=torch.float32)
    alpha = 0.01 * 0.2 * 48**0.5  # match_rms_adamw
    expected = before * (1 - 0.01 * train_compare.WEIGHT_DECAY) - alpha * two_steps
    # float32 arithmetic on both sides, in the same order: equal up to a few ulps of the weights.
    torch.testing.assert_close(down.detach(), expected, rtol=1e-5, atol=1e-6)
    assert (two_steps - five_steps).abs().max() > 1e-2  # the check would notice five steps


def test_auto_table_must_list_the_models_shapes(train_compare, tmp_path):
    table = hand_auto_table(tmp_path, {(16, 16): [MUON_ROW] * 3})
    with pytest.raises(
        train_compare.CalibrationError, match=re.escape("lacks the model's shapes [(16, 48)]")
    ):
        tiny_context(train_compare, tmp_path, "--arms", "ROOT auto-steps", "--auto-table", str(table))


def frontier_entry(rows_by_steps: dict) -> dict:
    """A table entry as --steps auto writes it: its chosen rows, and the rows it recorded per k."""
    frontier = [
        {"steps": k, "validation_error": 0.1 * k, "coefficients": [list(r) for r in rows]}
        for k, rows in rows_by_steps.items()
    ]
    return {
        "coefficients": rows_by_steps[max(rows_by_steps)],
        "metrics": {"steps_search": {"frontier": frontier}},
    }


def test_frontier_steps_runs_the_rows_the_search_recorded(train_compare, tmp_path):
    frontier = {2: [MUON_ROW, CLASSIC_ROW], 3: [MUON_ROW, MUON_ROW, CLASSIC_ROW]}
    table = hand_auto_table(
        tmp_path, {(16, 16): frontier_entry(frontier), (16, 48): frontier_entry(frontier)}
    )
    extra = ("--arms", "ROOT auto-steps", "--auto-table", str(table))
    _, ctx, lines = tiny_context(train_compare, tmp_path, *extra, "--frontier-steps", "2")
    assert ctx.tables["auto"].schedule_for((48, 16)).rows == (MUON_ROW, CLASSIC_ROW)
    assert any(
        "rows at 2 steps (`--frontier-steps`)" in line and "16×16: 2 steps (0.40× the FLOPs of 5)" in line
        for line in lines
    )
    message = "--frontier-steps 4: table hand-auto@1 records no 4-step rows for 16x16 "
    message += "(its frontier has steps [2, 3])"
    with pytest.raises(train_compare.CalibrationError, match=re.escape(message)):
        tiny_context(train_compare, tmp_path, *extra, "--frontier-steps", "4")


def test_new_arms_start_from_the_same_model_and_data(train_compare, tmp_path):
    """Paired by seed: at a negligible lr every arm's first loss is the seed's initial loss, alike."""
    table = hand_auto_table(tmp_path, {(16, 16): [MUON_ROW] * 3, (16, 48): [MUON_ROW] * 2})
    arms = ("Muon", "ROOT auto-steps", "ROOT exact polar (SVD)")
    _, ctx, _ = tiny_context(train_compare, tmp_path, "--arms", ",".join(arms), "--auto-table", str(table))
    first = {
        (arm, seed): train_compare.train(arm, 1e-9, seed, None, ctx, steps=1, evals=0).final
        for arm in arms
        for seed in (1, 2)
    }
    for seed in (1, 2):
        assert max(first[arm, seed] for arm in arms) - min(first[arm, seed] for arm in arms) < 1e-6
    assert abs(first["Muon", 1] - first["Muon", 2]) > 1e-3  # another seed: another initialisation
    again = train_compare.train("ROOT exact polar (SVD)", 0.01, 1, None, ctx, steps=2, evals=0).final
    assert again == train_compare.train("ROOT exact polar (SVD)", 0.01, 1, None, ctx, steps=2, evals=0).final


@pytest.mark.slow
def test_train_compare_auto_and_svd_arms_smoke(tmp_path):
    table = hand_auto_table(tmp_path, {(16, 16): [MUON_ROW] * 3, (16, 48): [MUON_ROW, CLASSIC_ROW]})
    arms = "Muon,ROOT auto-steps,ROOT exact polar (SVD)"
    args = [*TINY[: TINY.index("--calib-samples")], "--no-noisy", "--arms", arms, "--auto-table", str(table)]
    result = run_script(*args, "--plot", str(tmp_path / "curves.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for arm in arms.split(","):
        assert f"| clean | {arm} | 0.00" in result.stdout
    assert "exact polar factor U Vᵀ from torch.linalg.svd in float64" in result.stdout


# ---------------------------------------------------------------- issue 12: the closed-loop arms

# The spectral identity ‖NS(B) − U Vᵀ‖_F = ‖P(σ) − 1‖₂ holds exactly in exact arithmetic; in float64 on a
# 12×20 matrix both sides agree to ~1e-13, so 1e-9 checks the normalisation (by ‖σ‖₂ and the table's scale)
# while any slip in it (a missing 1.02, an unnormalised σ) moves the error by ≥ 1e-3.
SPECTRAL_IDENTITY_TOLERANCE = 1e-9


def test_recorded_errors_match_the_matrix_error(train_compare):
    """A table's error on a recorded spectrum is the float64 NS error on the matrix it came from."""
    import torch

    from root_core import load_table, orthogonalize
    from root_core.recording import RecordedSpectrum, singular_values

    B = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 7.0
    record = RecordedSpectrum(
        step=1,
        name="w",
        shape=(20, 12),
        singular_values=singular_values(B),
        clip_quantile=None,
        table="muon@1",
        table_hash="",
        rank=0,
    )
    U, _, Vh = torch.linalg.svd(B, full_matrices=False)
    for name in ("muon", "polar-express"):  # polar-express normalises by 1.02·‖B‖_F
        table = load_table(name)
        ns = orthogonalize(B, table.default_schedule, dtype=torch.float64)
        expected = float((ns - U @ Vh).norm() / (U @ Vh).norm())
        count, error = train_compare.recorded_errors([record], table)[(12, 20)]
        assert count == 1 and abs(error - expected) < SPECTRAL_IDENTITY_TOLERANCE, (name, error, expected)


def loop_context(train_compare, tmp_path: Path):
    from root_core.tables import CoefficientTable

    arms = ("Muon", "ROOT recorded", "ROOT online")
    _, ctx, _ = tiny_context(
        train_compare,
        tmp_path,
        "--arms",
        ",".join(arms),
        "--online-processes",
        "0",
        "--online-iterations",
        "2",
        "--record-every",
        "1",
        "--recalibrate-every",
        "2",
    )
    ctx.tables["recorded"] = CoefficientTable.create(  # what the recording run's calibration would give
        name="hand-recorded",
        default_rows=MUON_ROW,
        entries={(16, 16): [MUON_ROW] * 5, (16, 48): [MUON_ROW] * 5},
    )
    ctx.scratch, ctx.record_every, ctx.recalibrate_every = tmp_path, 1, 2
    ctx.online_processes, ctx.online_iterations = 0, 2
    return arms, ctx


@pytest.mark.slow
def test_closed_loop_arms_are_paired_and_recording_changes_nothing(train_compare, tmp_path):
    arms, ctx = loop_context(train_compare, tmp_path)
    first = {arm: train_compare.train(arm, 1e-9, 1, None, ctx, steps=1, evals=0).final for arm in arms}
    assert max(first.values()) - min(first.values()) < 1e-6  # same initialisation and batches
    plain = train_compare.train("ROOT recorded", 0.01, 1, None, ctx, steps=3, evals=0)
    recorded = train_compare.train(
        "ROOT recorded", 0.01, 1, None, ctx, steps=3, evals=0, record_dir=tmp_path / "rec"
    )
    assert plain.final == recorded.final and plain.probe is None
    # Every step recorded: 3 steps × (2 attention-square batches… ) spectra of both shapes, on disk too.
    shapes = {train_compare.canonical(r.shape) for r in recorded.probe.spectra}
    assert shapes == {(16, 16), (16, 48)} and len(list((tmp_path / "rec").glob("*.safetensors"))) == 3
    assert recorded.probe.record_seconds > 0 and recorded.probe.recalibrations == []


@pytest.mark.slow
def test_online_arm_refits_on_its_own_recordings(train_compare, tmp_path):
    _, ctx = loop_context(train_compare, tmp_path)
    run = train_compare.train("ROOT online", 0.01, 1, None, ctx, steps=4, evals=0)
    refits = run.probe.recalibrations
    assert [entry["launched"] for entry in refits] == [2] and [entry["applied"] for entry in refits] == [4]
    assert run.probe.table.name in ("muon", "muon-online")  # swapped only if better on held-out spectra
    assert len(run.probe.spectra) == 4 * 7  # 7 matrices per step, every step recorded


@pytest.mark.slow
def test_train_compare_closed_loop_smoke(tmp_path):
    arms = "Muon,ROOT recorded,ROOT online"
    args = [*TINY, "--calib-cache", str(tmp_path / "cache"), "--no-noisy", "--arms", arms]
    args += ["--record-every", "2", "--recalibrate-every", "3", "--online-processes", "0"]
    args += ["--online-iterations", "2", "--steps", "8"]
    result = run_script(*args, "--plot", str(tmp_path / "curves.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for arm in arms.split(","):
        assert f"| clean | {arm} | 0.00" in out
    header = (
        "| variant | momentum recorded in | final val loss | shape | spectra | muon (start) | polar-express |"
    )
    assert header + " recorded | online (end) |" in out
    for source in ("first run (seed 0, muon)", "ROOT recorded, seeds [1, 2]", "ROOT online, seeds [1, 2]"):
        assert f"| clean | {source} |" in out
    assert (
        "Recording overhead: the recorder" in out
        and "ROOT online, clean, seed 2: 1 refits applied (after steps 6)" in out
    )
    assert "--ratio 1:0`" in out and "--real " in out
