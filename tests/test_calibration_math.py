"""Spectra, the objective, the fit and the matrix check: each against an independent reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import MUON, POLAR_EXPRESS

from calibrate.errors import CalibrationError
from calibrate.evaluate import matrix_errors, polar_factor
from calibrate.fitting.fit import FitSettings, compress, fit, fold_scale, start_schedules
from calibrate.fitting.objective import mean_error, penalised_objective, safety
from calibrate.spectra import SpectrumCache, normalized_spectrum
from root_core import orthogonalize
from root_core.outliers import clip_to_quantile
from root_core.schedule import Schedule
from root_core.spectral import composition_range

# Gram + eigvalsh in float64 vs svdvals in float64: the Gram squares σ, so small σ lose digits; on
# these well-conditioned Gaussians both agree to ~1e-13 (docs/design.md §1.2: 1e-13 at 4096×11008).
SPECTRUM_ATOL = 1e-11
# Spectral error (float64, exact identity) vs the float64 matrix iteration: round-off only.
IDENTITY_ATOL = 1e-9


def gaussian(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 40)])
@pytest.mark.parametrize("clip", [None, 0.9])
def test_spectrum_equals_svdvals_of_the_clipped_normalised_matrix(shape, clip):
    M = gaussian(shape) ** 3
    B = M if clip is None else clip_to_quantile(M, clip)
    expected = torch.linalg.svdvals(B.double()) / B.double().norm()
    actual = normalized_spectrum(M, clip_quantile=clip)
    assert actual.dtype == torch.float64 and actual.shape == (min(shape),)
    torch.testing.assert_close(actual, expected, rtol=0, atol=SPECTRUM_ATOL)


def test_zero_matrix_has_a_zero_spectrum_not_nan():
    assert torch.equal(
        normalized_spectrum(torch.zeros(4, 6), clip_quantile=0.9), torch.zeros(4, dtype=torch.float64)
    )


@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS], ids=["muon", "polar-express"])
def test_spectral_error_equals_float64_matrix_error(schedule):
    M = gaussian((32, 96))
    sigma = normalized_spectrum(M, clip_quantile=0.9)
    B = clip_to_quantile(M, 0.9).double()
    exact = polar_factor(B)
    matrix_error = (orthogonalize(B, schedule, eps=0.0, dtype=torch.float64) - exact).norm() / exact.norm()
    assert mean_error(sigma[None], schedule) == pytest.approx(matrix_error.item(), abs=IDENTITY_ATOL)


def test_polar_factor_matches_svd_for_well_and_ill_conditioned_inputs():
    well = gaussian((20, 50)).double()
    U, _, Vh = torch.linalg.svd(well, full_matrices=False)
    torch.testing.assert_close(polar_factor(well), U @ Vh)
    ill = U @ torch.diag(torch.logspace(0, -9, 20, dtype=torch.float64)) @ Vh  # σ_min/σ_max = 1e-9
    torch.testing.assert_close(polar_factor(ill), U @ Vh)


def test_spectrum_cache_hits_on_the_same_bytes_and_misses_on_other_settings(tmp_path):
    cache = SpectrumCache(tmp_path)
    M = gaussian((16, 48))
    first = cache.spectrum(M, clip_quantile=0.9)
    assert torch.equal(cache.spectrum(M.clone(), clip_quantile=0.9), first)
    cache.spectrum(M, clip_quantile=None)
    assert (cache.hits, cache.misses) == (1, 2)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy", ".npy"]  # no temp files left


def test_safety_uses_the_exact_range_and_flags_sign_flips():
    assert safety(MUON, 1.25).ok and not safety(MUON, 1.2).ok
    flipping = Schedule(rows=((3.0, -6.0, 0.0),))  # p(1) = −3: a sign flip
    assert composition_range(flipping)[0] < 0 and not safety(flipping, 10.0).ok


def test_penalty_ranks_every_unsafe_set_above_every_safe_one():
    sigma = normalized_spectrum(gaussian((32, 96)), clip_quantile=0.9)[None]
    root_2048 = np.array([3.4916, -4.8224, 2.1095])  # docs/design.md §1: reaches 3.31 on (0, 1]
    unsafe = penalised_objective(root_2048, sigma, steps=5, shared=True, max_gain=1.25)
    identity = penalised_objective(np.array([1.0, 0.0, 0.0]), sigma, steps=5, shared=True, max_gain=1.25)
    assert identity < 1.0 < unsafe


def test_compress_keeps_evenly_spaced_order_statistics():
    spectra = torch.linspace(1, 0, 2000, dtype=torch.float64).expand(3, 2000)
    small = compress(spectra, points=101)
    assert small.shape == (3, 101) and small[0, 0] == 1 and small[0, -1] == 0


def test_start_points_fold_the_polar_express_scale_into_row_one():
    starts = start_schedules(5, shared=False)
    a, b, c = POLAR_EXPRESS.rows[0]
    assert starts["polar-express"].rows[0] == pytest.approx((a / 1.02, b / 1.02**3, c / 1.02**5))
    sigma = normalized_spectrum(gaussian((32, 96)), clip_quantile=0.9)[None]
    assert mean_error(sigma, starts["polar-express"]) == pytest.approx(
        mean_error(sigma, POLAR_EXPRESS), abs=1e-12
    )
    assert fold_scale(((1.0, 1.0, 1.0),), 2.0) == ((0.5, 0.125, 0.03125),)


@pytest.mark.parametrize("form", ["shared", "per-step"])
def test_fit_beats_every_published_start_within_the_bound_and_is_deterministic(form):
    spectra = torch.stack(
        [normalized_spectrum(gaussian((64, 256), seed), clip_quantile=0.9) for seed in range(4)]
    )
    # The mean criterion: the robust one may give up calibration error for the stress sets
    # (tests/test_robust_fit.py).
    settings = FitSettings(form=form, iterations=30, seed=3, criterion="mean")
    result = fit(spectra, settings, label="64x256")
    assert result.safety.ok and result.safety.high <= settings.max_gain
    feasible_starts = [
        e
        for label, e in result.start_errors.items()
        if safety(start_schedules(5, form == "shared")[label], settings.max_gain).ok
    ]
    assert result.calibration_error <= min(feasible_starts)
    # Muon's triple aims at fast growth, not at 1 (docs/design.md §2): a fit halves its error at least.
    assert result.calibration_error < 0.5 * mean_error(spectra, MUON)
    again = fit(spectra, settings, label="64x256")
    assert again.schedule.rows == result.schedule.rows


def test_a_tight_bound_is_respected_exactly():
    # The classic quintic is monotone with max 1, so any bound above 1 is feasible; the fit must stay in it.
    spectra = normalized_spectrum(gaussian((16, 48)), clip_quantile=0.9)[None]
    result = fit(spectra, FitSettings(form="shared", iterations=10, max_gain=1.0001))
    assert result.safety.ok and result.safety.high <= 1.0001


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(form="tiled"), "invalid schedule 'tiled': expected one of per-step, shared"),
        (dict(backend="nevergrad"), "invalid backend 'nevergrad': expected one of scipy, optuna"),
        (dict(steps=0), "invalid steps 0: expected an integer in [1, 20]"),
        (dict(max_gain=0.9), "invalid max gain 0.9: expected a number > 1"),
        (dict(storage="sqlite:///x.db"), "--storage needs --backend optuna"),
        (dict(criterion="minimax"), "invalid --fit 'minimax': expected one of robust, mean"),
    ],
)
def test_bad_fit_settings_are_named(kwargs, message):
    with pytest.raises(CalibrationError, match=re.escape(message)):
        FitSettings(**kwargs)


def test_matrix_check_agrees_with_the_spectral_error_in_float32():
    matrices = [gaussian((32, 96), seed) for seed in range(2)]
    errors = matrix_errors(
        matrices, {"muon": MUON}, clip_quantile=0.9, dtypes={"muon": ("float32", "bfloat16")}
    )
    spectral = [mean_error(normalized_spectrum(M, clip_quantile=0.9)[None], MUON) for M in matrices]
    # float32 NS differs from exact arithmetic by ~1e-6 relative (test_newton_schulz FLOAT32_RTOL).
    assert errors["muon"]["float32"] == pytest.approx(spectral, abs=2e-5)
    # bf16 adds ~1% of noise on top of Muon's ~0.15–0.2 spectral error.
    assert errors["muon"]["bfloat16"] == pytest.approx(spectral, abs=0.05)
