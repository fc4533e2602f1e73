"""benchmarks/train_compare.py runs end to end at a tiny size, and rejects bad input with one line."""

from __future__ import annotations

import importlib
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
