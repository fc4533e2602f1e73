"""The quantity calibration minimises, and the safety bound it must respect.

Error of a schedule on a sample = sqrt(mean_i (P(σ_i) − 1)²) over its normalised singular values
(docs/design.md §1); the objective is the mean over calibration samples. Safety: the composed polynomial
must stay within [0, max_gain] on all of [0, 1], with the range computed exactly, not on a grid, and
keep doing so when rounding pushes σ and each step's output up to ROUNDING_MARGIN too high.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from root_core.schedule import Schedule
from root_core.spectral import ROUNDING_MARGIN, composition_range, spectral_error

# A composition this far below 0 on [0, 1] has flipped a sign; −1e-12 forgives float64 round-off of P(0).
SIGN_FLIP_TOLERANCE = 1e-12
# Around Muon's 1.2024 and Polar Express's 1.1411 (docs/design.md §1): bounded updates, room to fit.
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
    vector: np.ndarray,
    spectra: Tensor,
    *,
    steps: int,
    shared: bool,
    max_gain: float,
    stress: Sequence[StressSet] = (),
    stress_mode: str = "constraint",
) -> float:
    """Mean error, plus 1 + the violation when the bound (or, in "constraint" mode, a stress set) is broken.

    Every feasible schedule scores below 1 + error of the trivial map, and every infeasible one
    above it, so a search never prefers an unsafe set; the violation term still gives it a slope back.
    In "penalty" mode the stress sets' excess over the baseline is added to the error instead.
    """
    schedule = Schedule(rows=rows_from_vector(vector, steps, shared), steps=steps)
    bound = safety(schedule, max_gain)
    error = mean_error(spectra, schedule)
    if not np.isfinite(error):
        return 1e6
    excess = stress_excess(schedule, stress) if stress else 0.0
    if not math.isfinite(excess):
        return 1e6
    if stress_mode == "penalty":
        error, excess = error + excess, 0.0
    if bound.ok and excess == 0.0:
        return error
    return error + 1.0 + bound.violation + excess


# ---- stress sets: the robust fit's guarantee against a baseline (issue 10) ------------------------------

# The "tail" of a spectrum is its lowest quarter of singular values (by rank, not by value, so it means the
# same on every family: on the default mix at 256x256 and 768x2304, 6-98% of σ lie below 0.05·σ_max, so
# a value threshold would push almost a whole low-rank spectrum down on one sample and nothing on another).
# The calibration spectra's lowest quartile sits at 2e-3–2e-1·σ_max; ×0.1 and ×0.01 put 25% of σ below
# ~3e-4 and ~3e-5·σ_max: the 10–36% below 1e-3·σ_max that clipped real momentum from other models has,
# early in training and in AdamW's exp_avg (benchmarks/RESULTS.md, "Robust fit (issue 10)").
TAIL_FRACTION = 0.25
TAIL_FACTORS = {"tail-x0.1": 0.1, "tail-x0.01": 0.01}
# The early-training regime: a few large σ (the top 1/32 of the rank, at least one) over a deep tail,
# everything else pushed 100× down.
LOW_RANK_KEEP = 1 / 32
LOW_RANK_FACTOR = 0.01
LOW_RANK_NAME = "low-rank"
# The rows may not be worse than the baseline on a stress set by more than float64 round-off: the baseline
# itself (with its scale folded into row 1) differs from its own error by ~1e-16.
STRESS_TOLERANCE = 1e-12
# Stress constraint modes: "constraint" ranks every stress-violating set above every compliant one (like
# the safety bound); "penalty" adds the excess to the mean error (a soft worst-case term, for comparison).
STRESS_MODES = ("constraint", "penalty")
# Tail statistics report σ/σ_max below this: Polar Express's design interval starts at 1e-3
# (docs/design.md §2).
TAIL_THRESHOLD = 1e-3


@dataclass(frozen=True)
class StressSet:
    """Stressed calibration spectra and the baseline's mean error on them (the level to match)."""

    name: str
    spectra: Tensor
    baseline_error: float


def pushed_tail(spectra: Tensor, count: int, factor: float) -> Tensor:
    """The ``count`` smallest σ of each spectrum times ``factor``, renormalised to the spectrum's own
    Frobenius norm (Newton–Schulz divides by ‖G‖_F, so a lower tail makes the rest relatively larger)."""
    ordered = spectra.sort(dim=-1, descending=True).values
    scale = torch.ones_like(ordered)
    if count > 0:
        scale[..., ordered.shape[-1] - count :] = factor
    stressed = ordered * scale
    norm = stressed.norm(dim=-1, keepdim=True)
    ratio = torch.where(norm > 0, ordered.norm(dim=-1, keepdim=True) / norm.clamp_min(1e-300), 1.0)
    return stressed * ratio


def stress_spectra(spectra: Tensor) -> dict[str, Tensor]:
    """The stress variants of (samples × r) spectra: the tail 10× and 100× lower, and the low-rank regime."""
    r = spectra.shape[-1]
    tail = max(1, round(TAIL_FRACTION * r))
    keep = max(1, math.ceil(LOW_RANK_KEEP * r))
    sets = {name: pushed_tail(spectra, tail, factor) for name, factor in TAIL_FACTORS.items()}
    sets[LOW_RANK_NAME] = pushed_tail(spectra, r - keep, LOW_RANK_FACTOR)
    return sets


def stress_sets(spectra: Tensor, baseline: Schedule) -> list[StressSet]:
    return [
        StressSet(name=name, spectra=s, baseline_error=mean_error(s, baseline))
        for name, s in stress_spectra(spectra).items()
    ]


def stress_excess(schedule: Schedule, stress: Sequence[StressSet]) -> float:
    """Sum over stress sets of how much worse than the baseline the schedule is (0 when no worse)."""
    errors = stress_errors(schedule, stress)
    if not all(math.isfinite(e) for e in errors):
        return math.inf
    return sum(max(0.0, e - s.baseline_error - STRESS_TOLERANCE) for e, s in zip(errors, stress, strict=True))


def stress_errors(schedule: Schedule, stress: Sequence[StressSet]) -> list[float]:
    """The schedule's mean error on each stress set; sets of one shape go through one batched evaluation
    (per-call overhead, not flops, dominates at the search's few hundred points per spectrum)."""
    if len({s.spectra.shape for s in stress}) == 1:
        return sample_errors(torch.stack([s.spectra for s in stress]), schedule).mean(dim=-1).tolist()
    return [mean_error(s.spectra, schedule) for s in stress]


def tail_statistics(spectra: Tensor) -> dict[str, float]:
    """The deepest tail among spectra: the largest fraction of σ below TAIL_THRESHOLD·σ_max, the lowest
    σ_min/σ_max (a zero spectrum counts as neither)."""
    top = spectra.amax(dim=-1, keepdim=True)
    live = top.squeeze(-1) > 0
    if not bool(live.any()):
        return {"fraction_below_1e-3": 0.0, "lowest_sigma": 1.0}
    relative = spectra[live] / top[live]
    return {
        "fraction_below_1e-3": float((relative < TAIL_THRESHOLD).double().mean(dim=-1).max()),
        "lowest_sigma": float(relative.amin()),
    }
