"""A Newton–Schulz coefficient schedule: the rows a table stores for one shape, plus their normalisation."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Muon's and torch.optim.Muon's step count; also what a single shared row is repeated to by default.
DEFAULT_NS_STEPS = 5
# Every coefficient set we know normalises by the Frobenius norm; a scale above 1 (Polar Express: 1.02)
# is a safety margin that keeps the largest singular value strictly inside (0, 1].
DEFAULT_SCALE = 1.0
# The floor of the normaliser, X = G / max(scale·‖G‖_F, eps): torch.optim.Muon's eps (KellerJordan/Muon).
# It only matters for gradients with ‖G‖_F near or below it, and keeps a zero gradient at zero.
DEFAULT_EPS = 1e-7

Row = tuple[float, float, float]

# Steps past the ones a schedule's rows were fitted for run its last row again only if that keeps P(σ)
# inside the range the fitted steps reach; otherwise they run the textbook quintic (15/8, −10/8, 3/8).
# Its p(1) = 1, p'(1) = 0 and p'(x) = 15(1 − x²)²/8 ≥ 0: p is increasing and moves every σ in
# (0, √(7/3) ≈ 1.53) towards 1, so it can only narrow what the fitted rows produced (a calibrated table
# keeps P ≤ 1.25 under the rounding margin), where a fitted last row repeated can blow up: the
# llama-3.2-1b-shared v2 rows, repeated to 10 steps, reach 9e273 (root_core.spectral.composition_range,
# margin 0.02). Polar Express's last row is no candidate: repeated it settles at 1.035, not 1.
CONVERGENT_ROW: Row = (15 / 8, -10 / 8, 3 / 8)
# Beyond this P, CONVERGENT_ROW cannot pull σ back (p(x) > x above √(7/3)): rows that already reach it
# within their own steps are fragile (ROOT warns) and keep repeating their last row, as published
# (the ROOT paper's 2048×2048 triple: P = 679 at 6 steps, docs/design.md).
CONVERGENT_BASIN = math.sqrt(7 / 3)
# How far ahead repeating the last row is checked (torch.optim.Muon refuses 100 steps or more).
CONTINUATION_HORIZON = 100


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Quintic Newton–Schulz rows and the input normalisation they assume.

    The iteration runs on ``X = G / max(scale * ||G||_F, eps)`` (eps comes from the table). ``rows``
    holds one ``(a, b, c)`` per step; a single row means "repeat it", ``steps`` times (default 5). With
    several rows, ``steps`` defaults to their count. Fewer steps use the first rows; more steps than
    ``num_steps`` continue with :attr:`continuation`: the last row when repeating it stays bounded (Muon,
    Polar Express), else the convergent classic row (fitted rows that blow up when repeated).
    """

    rows: tuple[Row, ...]
    scale: float = DEFAULT_SCALE
    steps: int | None = None

    def __post_init__(self) -> None:
        rows = tuple(_as_row(row, index) for index, row in enumerate(self.rows))
        if not rows:
            raise ValueError("Schedule needs at least one (a, b, c) row, got none")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Schedule scale must be a finite number > 0, got {self.scale!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"Schedule steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def num_steps(self) -> int:
        """How many Newton–Schulz steps this schedule runs when the caller does not say."""
        if self.steps is not None:
            return self.steps
        return DEFAULT_NS_STEPS if len(self.rows) == 1 else len(self.rows)

    def expanded(self, steps: int | None = None) -> tuple[Row, ...]:
        """The rows actually applied, one per step, for ``steps`` steps (default: ``num_steps``)."""
        count = self.num_steps if steps is None else steps
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"Newton–Schulz steps must be an integer >= 1, got {count!r}")
        fitted = self.num_steps
        last = len(self.rows) - 1
        return tuple(self.rows[min(k, last)] if k < fitted else self.continuation for k in range(count))

    @functools.cached_property
    def continuation(self) -> Row:
        """The row for steps past ``num_steps``: the last row if repeating it (for CONTINUATION_HORIZON
        steps, under the rounding margin) keeps P within the range the fitted steps reach, else
        CONVERGENT_ROW; the last row too when the fitted steps already leave CONVERGENT_BASIN."""
        from .spectral import ROUNDING_MARGIN, composition_range  # spectral builds on this module

        reached = max(1.0, composition_range(self, self.num_steps, margin=ROUNDING_MARGIN)[1])
        if not reached < CONVERGENT_BASIN:
            return self.rows[-1]
        # The last row alone, from every σ ≤ reached; its own steps, so this never asks for a continuation.
        repeated = Schedule(rows=(self.rows[-1],), scale=1.0 / reached, steps=CONTINUATION_HORIZON)
        high = composition_range(repeated, margin=ROUNDING_MARGIN)[1]
        return self.rows[-1] if high <= reached * (1.0 + ROUNDING_MARGIN) else CONVERGENT_ROW

    def with_steps(self, steps: int | None) -> Schedule:
        """This schedule run for ``steps`` steps, as explicit per-step rows (``None``: unchanged).

        The rows are resolved here, so steps past ``num_steps`` keep their :attr:`continuation`.
        """
        if steps is None:
            return self
        return Schedule(rows=self.expanded(steps), scale=self.scale, steps=steps)


def as_schedule(spec: Schedule | Sequence[Sequence[float]] | Sequence[float]) -> Schedule:
    """Accept a Schedule, one ``(a, b, c)`` triple, or a sequence of rows (scale 1)."""
    if isinstance(spec, Schedule):
        return spec
    if hasattr(spec, "tolist"):  # a tensor or an array: (3,) or (k, 3)
        spec = spec.tolist()
    rows = list(spec)
    if len(rows) == 3 and all(isinstance(value, (int, float)) for value in rows):
        return Schedule(rows=(tuple(rows),))
    return Schedule(rows=tuple(tuple(row) for row in rows))


def _as_row(row: Sequence[float], index: int) -> Row:
    try:
        values = tuple(float(value) for value in row)
    except (TypeError, ValueError):
        raise ValueError(f"coefficient row {index} must be three numbers (a, b, c), got {row!r}") from None
    if len(values) != 3:
        raise ValueError(f"coefficient row {index} must have 3 values (a, b, c), got {len(values)}: {row!r}")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"coefficient row {index} has a non-finite value: {row!r}")
    return values  # type: ignore[return-value]
