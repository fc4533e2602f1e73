"""Cost-aware calibration (issue 14): the fewest Newton–Schulz steps whose rows reach a target, per shape.

``root-calibrate --steps auto --target T`` fits rows for k = 2, 3, … (at most 10) steps on the same
calibration spectra (computed once per shape), scores each k's rows on the validation spectra and, with
the robust fit, on its stress sets, and keeps the first k that reaches the target. The errors per k are
the shape's *frontier*, recorded in the table next to each k's matmul FLOPs (``ns_matmul_flops``).

Pure functions here (targets, the choice of k, FLOPs); ``calibrate.fitting.pipeline`` runs the fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import CalibrationError

# The step counts searched: 1 step cannot lift σ ≈ 1e-3 to 1 under the bound (a ≤ 9.5 per row), and 10
# is the longest published schedule (DeepSeek-V4).
MIN_AUTO_STEPS = 2
MAX_AUTO_STEPS = 10
# Named targets: the set's error at its own (published) 5 steps on the same validation spectra.
TARGET_SETS = ("polar-express", "muon")
# The default target: Polar Express's 5-step error. An auto table then is never less precise on its own
# validation spectra than the strongest published 5-step set, and only saves steps where calibration
# reaches that precision sooner; a fixed number would instead ask square shapes, where every 5-step set
# stalls near 0.3 (benchmarks/RESULTS.md, issue 10), for 8–10 steps, i.e. cost more than today's default.
DEFAULT_TARGET = "polar-express"
# An absolute target (a number) is a promise about the user's momentum, so it must also hold on the mean
# error over the shape's real momentum samples (calibration and validation: a 16-sample run validates on
# ~1 real sample). The mixed validation alone is too easy to promise it: its synthetic gaussian and
# heavy-tailed samples are well conditioned at rectangular shapes (σ_min ≈ 0.4·σ_max at 896×4864), so
# at 896×4864 qwen's 5-step rows scored 0.089 on validation, 0.128 on the real samples, and 0.178 on
# independent held-out momentum (benchmarks/RESULTS.md, issue 14). Named targets compare with their set
# on the same spectra, and the robust fit's stress sets cover deep tails, so they need no such level.
# Equal errors count as reaching the target: Polar Express's own rows, shipped by the fallback with its
# 1.02 scale folded into row 1 (docs/design.md §1.3), score its error up to float64 round-off.
TARGET_TOLERANCE = 1e-9
# Each k gets this fraction of --iterations (at least AUTO_MIN_ITERATIONS): at 896×4864, 25 DE generations
# per k gave validation errors within 0.002 of 200 generations at k = 5 and 6, at 1/7–1/4 of the time
# (benchmarks/RESULTS.md, issue 14), and the shared spectra plus the stop at the first k that reaches the
# target keep an auto run within 2× a fixed-step one.
AUTO_ITERATION_DIVISOR = 8
AUTO_MIN_ITERATIONS = 5


def ns_matmul_flops(shape: Sequence[int], steps: int) -> int:
    """Matmul FLOPs of one standard-form Newton–Schulz call on an m×n matrix, m = min side (tall inputs
    run transposed). Each step forms A = X Xᵀ (2m²n), A² (2m³) and (bA + cA²)·X (2m²n): 4m²n + 2m³ per
    step, a multiply-add counted as 2 FLOPs; the elementwise work (normalisation, a·X) is O(mn) and left
    out."""
    m, n = min(shape), max(shape)
    return steps * (4 * m * m * n + 2 * m**3)


@dataclass(frozen=True)
class Target:
    """What an auto run's rows must reach: an absolute error, or a named set's 5-step error."""

    text: str
    value: float | None = None
    reference: str | None = None

    def describe(self) -> str:
        if self.value is not None:
            return f"relative error ≤ {self.value:g}"
        return f"{self.reference}'s 5-step error on the same spectra"


def parse_target(text: str) -> Target:
    """``0.1`` or ``polar-express`` / ``muon``; anything else is one line naming the value."""
    cleaned = text.strip().lower()
    if cleaned in TARGET_SETS:
        return Target(text=cleaned, reference=cleaned)
    try:
        value = float(cleaned)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise CalibrationError(
            f"invalid --target '{text}': expected a relative error in (0, 1) such as 0.1, "
            f"or one of {', '.join(TARGET_SETS)}"
        )
    return Target(text=cleaned, value=value)


def parse_steps(text: str) -> int | None:
    """``--steps``: an integer in [1, MAX_AUTO_STEPS] (fixed), or ``auto`` (None)."""
    cleaned = text.strip().lower()
    if cleaned == "auto":
        return None
    try:
        steps = int(cleaned)
    except ValueError:
        steps = 0
    if not 1 <= steps <= MAX_AUTO_STEPS:
        raise CalibrationError(
            f"invalid --steps '{text}': expected an integer in [1, {MAX_AUTO_STEPS}] or 'auto'"
        )
    return steps


@dataclass(frozen=True)
class TargetLevels:
    """The target as numbers on one shape's spectra: a validation error, and per stress set an error.

    ``stress`` is empty where the fit defines no stress sets (``--fit mean``).
    """

    validation: float
    stress: Mapping[str, float] = field(default_factory=dict)
    # An absolute target's level on the shape's real momentum samples (note at the top); None: no level.
    real: float | None = None


def target_levels(
    target: Target,
    validation_errors: Mapping[str, float],
    stress_errors: Mapping[str, Mapping[str, float]],
    stress_reference: str,
    has_real: bool = False,
) -> TargetLevels:
    """The levels a k must reach at one shape.

    ``validation_errors``: each named set's 5-step mean error on the validation spectra;
    ``stress_errors``: set → stress set → its 5-step error there (empty without the robust fit).
    Validation: the number, or the named set's error. Stress: the stress sets are worst cases built to be
    harder than real spectra (``calibrate.fitting.objective``), where even 10 fitted steps barely reach 0.1,
    so the level there is the number or the reference set's own 5-step stress error, whichever is larger:
    a k qualifies only if its rows are no less robust on deep tails than the published 5-step set
    (``stress_reference``: Polar Express per-step, Muon shared; a named target: that set).
    Real momentum (``has_real``: the shape has real samples): an absolute target must also hold on their
    mean error (note at the top); a named target compares with its set on the same spectra and needs none.
    """
    reference = target.reference or stress_reference
    validation = validation_errors[target.reference] if target.reference else target.value
    floor = target.value if target.value is not None else 0.0
    stress = {name: max(floor, error) for name, error in stress_errors.get(reference, {}).items()}
    real = target.value if target.value is not None and has_real else None
    return TargetLevels(validation=float(validation), stress=stress, real=real)


@dataclass(frozen=True)
class FrontierPoint:
    """One k of a shape's frontier: the errors of the rows the table would ship at k."""

    steps: int
    validation_error: float
    stress_errors: Mapping[str, float] = field(default_factory=dict)
    shipped: str = "fitted"  # "fitted", or the baseline whose rows replace fitted rows that lose to it
    bound: float | None = None
    rows: tuple[tuple[float, float, float], ...] = ()  # the rows shipped at k (scale 1)
    seconds: float | None = None  # the fit's time at k
    real_error: float | None = None  # the mean error on the shape's real momentum samples (None: none)

    def reaches(self, levels: TargetLevels) -> bool:
        if not self.validation_error <= levels.validation + TARGET_TOLERANCE:
            return False
        real = math.inf if self.real_error is None else self.real_error
        if levels.real is not None and not real <= levels.real + TARGET_TOLERANCE:
            return False
        return all(
            self.stress_errors.get(name, math.inf) <= level + TARGET_TOLERANCE
            for name, level in levels.stress.items()
        )


def choose_steps(frontier: Sequence[FrontierPoint], levels: TargetLevels) -> int | None:
    """The fewest steps on the frontier whose rows reach the target; None where none does."""
    reached = [point.steps for point in frontier if point.reaches(levels)]
    return min(reached) if reached else None


def auto_iterations(iterations: int) -> int:
    """Search generations for each k of an auto run (see AUTO_ITERATION_DIVISOR)."""
    return max(AUTO_MIN_ITERATIONS, iterations // AUTO_ITERATION_DIVISOR)


def frontier_record(
    shape: Sequence[int],
    frontier: Sequence[FrontierPoint],
    levels: TargetLevels,
    target: Target,
    chosen: int | None,
    baselines: Mapping[str, Mapping[int, float]],
) -> dict:
    """The ``steps_search`` metrics of a table entry: the target, each k's errors and FLOPs, the choice.

    ``baselines``: set → k → its validation error at k (Polar Express extended by its last row), so a
    reader can see how many steps the published sets need for the same error.
    """
    searched = [p.steps for p in frontier]
    return {
        "target": target.text,
        "target_meaning": target.describe(),
        "target_validation_error": levels.validation,
        "target_stress_errors": dict(levels.stress),
        "target_real_momentum_error": levels.real,
        "chosen_steps": chosen,
        "reached": chosen is not None,
        # Fits run in increasing k and stop at the first k that reaches the target: larger k were not fitted.
        "searched_steps": [min(searched), max(searched)] if searched else [],
        "stopped_early": bool(searched) and max(searched) < MAX_AUTO_STEPS,
        "flops_formula": "steps * (4*m*m*n + 2*m**3), m = min side (calibrate.fitting.steps.ns_matmul_flops)",
        "frontier": [
            {
                "steps": p.steps,
                "validation_error": p.validation_error,
                "stress_errors": dict(p.stress_errors),
                "real_momentum_error": p.real_error,
                "shipped": p.shipped,
                "bound": p.bound,
                "flops": ns_matmul_flops(shape, p.steps),
                "reaches_target": p.reaches(levels),
                "coefficients": [list(row) for row in p.rows],
                "fit_seconds": None if p.seconds is None else round(p.seconds, 3),
            }
            for p in frontier
        ],
        "baselines_by_steps": {
            name: {str(k): error for k, error in sorted(by_k.items())} for name, by_k in baselines.items()
        },
    }


def steps_to_reach(errors_by_steps: Mapping[int, float], level: float) -> int | None:
    """The fewest k whose error reaches ``level``; None where no k listed does (a baseline's count)."""
    reached = [k for k, error in errors_by_steps.items() if error <= level + TARGET_TOLERANCE]
    return min(reached) if reached else None
