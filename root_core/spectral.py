"""What a Newton–Schulz schedule does to singular values: the scalar side of docs/design.md §1.

NS maps each normalised singular value σ to P(σ) = p_K(…p_1(σ/scale)…), so the relative error against
the exact polar factor is sqrt(mean (P(σ_i) − 1)²) over the r = min(m, n) singular values.
"""

from __future__ import annotations

import math

from torch import Tensor

from .schedule import Schedule

# How far (relative) rounding may push σ and each step's output above their exact values, for
# composition_range(..., margin=...). bf16 keeps 8 significant bits, so one rounding moves an entry by up to
# 2^-9 ≈ 0.2%; the normalisation and five products compound that, and 2% leaves ~5× room. The published
# sets survive it: Polar Express (built with a 1.01 safety factor) stays at 1.21 and Muon at 1.20.
ROUNDING_MARGIN = 0.02


def compose(sigma: Tensor, schedule: Schedule, steps: int | None = None) -> Tensor:
    """P(σ) for singular values σ of the *unnormalised-by-scale* input (σ = σ_i(G)/‖G‖_F)."""
    x = sigma / schedule.scale
    for a, b, c in schedule.expanded(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def spectral_error(sigma: Tensor, schedule: Schedule, steps: int | None = None) -> Tensor:
    """Relative Frobenius error ‖NS(G) − U Vᵀ‖ / ‖U Vᵀ‖ from the normalised spectrum (last dim)."""
    residual = compose(sigma, schedule, steps) - 1.0
    return residual.square().mean(dim=-1).sqrt()


def composition_range(
    schedule: Schedule, steps: int | None = None, *, margin: float = 0.0
) -> tuple[float, float]:
    """Exact (min, max) of P over σ ∈ [0, 1], with no grid (docs/design.md §1); with ``margin`` > 0, a bound
    that also holds when the input and every intermediate value are up to ``margin`` (relative) too large.

    The image of an interval under a continuous p is an interval whose ends are p at the interval's
    ends or at interior critical points, the roots of a + 3b·x² + 5c·x⁴ = 0. A sampled grid would miss
    the narrow spikes of a degree-3125 composition. The margin models rounding in low precision: bf16
    can leave a normalised σ slightly above 1 and perturbs every product, and a quintic fitted on
    [0, 1] alone may blow up just outside it (some reach 1e20 at 1.01). Widening each step's interval
    by the margin before mapping it makes the range an upper bound over all such perturbations.
    """
    low, high = 0.0, 1.0 / schedule.scale
    for a, b, c in schedule.expanded(steps):
        high *= 1.0 + margin
        candidates = [low, high, *(x for x in _critical_points(a, b, c) if low < x < high)]
        values = [x * (a + x * x * (b + c * x * x)) for x in candidates]
        low, high = min(values), max(values)
    return low, high


def _critical_points(a: float, b: float, c: float) -> list[float]:
    """Real x with p'(x) = a + 3b·x² + 5c·x⁴ = 0, solved as a quadratic in y = x²."""
    if c == 0.0:
        squares = [-a / (3.0 * b)] if b != 0.0 else []
    else:
        disc = 9.0 * b * b - 20.0 * a * c
        if disc < 0.0:
            return []
        root = math.sqrt(disc)
        squares = [(-3.0 * b - root) / (10.0 * c), (-3.0 * b + root) / (10.0 * c)]
    points = []
    for y in squares:
        if y >= 0.0:
            points += [math.sqrt(y), -math.sqrt(y)]
    return points
