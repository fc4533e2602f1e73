"""The scalar side: composition, spectral error and the exact range on [0, 1]."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSIC, FRAGILE, MUON, POLAR_EXPRESS

from root_core.schedule import Schedule
from root_core.spectral import composition_range, spectral_error

# docs/design.md §2: the ROOT paper's published triple for 2048×2048.
ROOT_2048 = Schedule(rows=((3.4916, -4.8224, 2.1095),))


@pytest.mark.parametrize(
    ("schedule", "steps", "expected_max", "half_last_digit"),
    [
        # docs/design.md §1.4 quotes these maxima of the exact range on (0, 1]; each must agree to the
        # digits quoted.
        (MUON, None, 1.2024, 5e-5),
        (POLAR_EXPRESS, None, 1.1411, 5e-5),
        (ROOT_2048, 5, 3.31, 5e-3),
        (ROOT_2048, 6, 679.0, 0.5),
    ],
)
def test_exact_range_matches_the_published_figures(schedule, steps, expected_max, half_last_digit):
    low, high = composition_range(schedule, steps)
    assert low == 0.0
    assert high == pytest.approx(expected_max, abs=half_last_digit)


@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS, ROOT_2048, CLASSIC])
def test_exact_range_bounds_a_dense_grid_and_is_attained(schedule):
    sigma = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    x = sigma / schedule.scale
    for a, b, c in schedule.expanded():
        x = a * x + b * x**3 + c * x**5
    low, high = composition_range(schedule)
    assert low <= x.min().item() + 1e-12 and x.max().item() <= high + 1e-12
    # A grid can only under-estimate the maximum; with 2e5 points it gets within 1%.
    assert x.max().item() > 0.99 * high


def test_spectral_error_is_zero_at_the_fixed_point_and_rms_elsewhere():
    sigma = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    error = spectral_error(sigma, Schedule(rows=((1.0, 0.0, 0.0),)))
    torch.testing.assert_close(error, torch.tensor([0.0, 0.5**0.5], dtype=torch.float64))


@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS, FRAGILE])
@pytest.mark.parametrize("margin", [0.005, 0.02])
def test_margin_range_bounds_every_perturbed_run(schedule, margin):
    """Every run whose input and step outputs are up to ``margin`` too large stays inside the range."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 20_001, dtype=torch.float64).repeat(8, 1)  # 8 perturbation patterns
    x = x / schedule.scale
    for a, b, c in schedule.expanded():
        x = x * (1 + margin * torch.rand(x.shape, generator=generator, dtype=torch.float64))
        x = a * x + b * x**3 + c * x**5
    low, high = composition_range(schedule, margin=margin)
    assert low <= x.min().item() + 1e-12 and x.max().item() <= high * (1 + 1e-12)
    assert composition_range(schedule, margin=0.0) == composition_range(schedule)


def test_margin_separates_robust_published_sets_from_a_fragile_fit():
    # Muon and Polar Express survive 2% rounding within 1.25; the [0, 1]-only fit does not survive 1%.
    assert composition_range(MUON, margin=0.02)[1] < 1.21
    assert composition_range(POLAR_EXPRESS, margin=0.02)[1] < 1.22
    assert composition_range(FRAGILE)[1] <= 1.25
    assert composition_range(FRAGILE, margin=0.01)[1] > 1e10
