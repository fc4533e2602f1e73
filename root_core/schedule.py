"""A Newton–Schulz coefficient schedule: the rows a table stores for one shape, plus their normalisation."""

from __future__ import annotations

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


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Quintic Newton–Schulz rows and the input normalisation they assume.

    The iteration runs on ``X = G / max(scale * ||G||_F, eps)`` (eps comes from the table). ``rows``
    holds one ``(a, b, c)`` per step; a single row means "repeat it", ``steps`` times (default 5). With
    several rows, ``steps`` defaults to their count. Asking for more steps than rows repeats the last row,
    which is how per-step sets such as Polar Express are extended; fewer steps use the first rows.
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
        return tuple(self.rows[min(k, len(self.rows) - 1)] for k in range(count))

    def with_steps(self, steps: int | None) -> Schedule:
        """The same rows and scale run for ``steps`` steps (``None`` keeps this schedule's own count)."""
        if steps is None:
            return self
        return Schedule(rows=self.rows, scale=self.scale, steps=steps)


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
