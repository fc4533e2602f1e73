"""The quantity calibration minimises, and the safety bound it must respect.

Error of a schedule on a sample = sqrt(mean_i (P(σ_i) − 1)²) over its normalised singular values
(DESIGN.md §1); the objective is the mean over calibration samples. Safety: the composed polynomial
must stay within [0, max_gain] on all of [0, 1], with the range computed exactly, not on a grid, and
keep doing so when rounding pushes σ and each step's output up to ROUNDING_MARGIN too high.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from root_core.schedule import Schedule
from root_core.spectral import ROUNDING_MARGIN, composition_range, spectral_error

# A composition this far below 0 on [0, 1] has flipped a sign; −1e-12 forgives float64 round-off of P(0).
SIGN_FLIP_TOLERANCE = 1e-12
# Around Muon's 1.2024 and Polar Express's 1.1411 (DESIGN.md §1): bounded updates, room to fit.
DEFAULT_MAX_GAIN = 1.25
# The fit's bound must also hold with σ and every step's output up to root_core's ROUNDING_MARGIN (2%) too
# large: tables fitted on [0, 1] alone reached 1e20 at a 1% margin and diverged in bf16 training on spiky
# momentum (benchmarks/train_compare.py, no soft-threshold).


@dataclass(frozen=True)
class Safety:
    """The exact range of P on [0, 1] and whether it respects the bound."""

    low: float
    high: float
    max_gain: float
    margin: float = ROUNDING_MARGIN

    @property
    def ok(self) -> bool:
        return self.high <= self.max_gain and self.low >= -SIGN_FLIP_TOLERANCE

    @property
    def violation(self) -> float:
        """How far outside the bound, 0 when inside; the fit's penalty grows with it."""
        return max(0.0, self.high - self.max_gain) + max(0.0, -self.low - SIGN_FLIP_TOLERANCE)


def safety(schedule: Schedule, max_gain: float = DEFAULT_MAX_GAIN, margin: float = ROUNDING_MARGIN) -> Safety:
    """The range of P over [0, 1] widened by ``margin`` at every step (0: the exact range on [0, 1])."""
    low, high = composition_range(schedule, margin=margin)
    return Safety(low=low, high=high, max_gain=max_gain, margin=margin)


def stack_spectra(spectra: Sequence[Tensor]) -> Tensor:
    """One (samples, r) float64 tensor; all samples of one canonical shape have the same r."""
    return torch.stack([s.to(torch.float64) for s in spectra])


def sample_errors(spectra: Tensor, schedule: Schedule) -> Tensor:
    """Per-sample relative error of ``schedule`` against the exact polar factor, float64."""
    return spectral_error(spectra, schedule)


def mean_error(spectra: Tensor, schedule: Schedule) -> float:
    return float(sample_errors(spectra, schedule).mean())


def rows_from_vector(vector: np.ndarray, steps: int, shared: bool) -> tuple[tuple[float, float, float], ...]:
    """Search vector → schedule rows: 3 numbers (one triple repeated) or 3·steps (one row per step)."""
    values = [float(v) for v in vector]
    if shared:
        return (tuple(values),)  # type: ignore[return-value]
    return tuple(tuple(values[3 * k : 3 * k + 3]) for k in range(steps))  # type: ignore[misc]


def penalised_objective(
    vector: np.ndarray, spectra: Tensor, *, steps: int, shared: bool, max_gain: float
) -> float:
    """Mean error, plus 1 + the violation when the bound is broken.

    Every feasible schedule scores below 1 + error of the trivial map, and every infeasible one
    above it, so a search never prefers an unsafe set; the violation term still gives it a slope back.
    """
    schedule = Schedule(rows=rows_from_vector(vector, steps, shared), steps=steps)
    bound = safety(schedule, max_gain)
    error = mean_error(spectra, schedule)
    if not np.isfinite(error):
        return 1e6
    return error if bound.ok else error + 1.0 + bound.violation
