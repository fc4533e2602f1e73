"""Error against cost per shape (issue 14): what `root-calibrate plot` draws as its FLOPs figure and
`report` prints under its table.

Each coefficient set is a point per step count it runs: Muon at 5, Polar Express at 5–10 (its last row
repeated), You's set at 6, and a calibrated table at its own count, or, where its entry records an auto
search (``--steps auto``), at every k of the frontier. Cost is the matmul FLOPs of one Newton–Schulz call
(``calibrate.fitting.steps.ns_matmul_flops``); error the mean float64 spectral error on the analysis's
samples.
"""

from __future__ import annotations

import pandas as pd

from root_core.schedule import Schedule
from root_core.tables import load_table

from ..fitting.objective import sample_errors
from ..fitting.steps import ns_matmul_flops
from ..shapes import format_shape
from .precision import REPORT_QUANTILE, Analysis, Entrant, ShapeKey

# The published points: the counts each set is run at in practice (Polar Express: its 5 steps and the
# longer runs issue 14 compares with, up to DeepSeek-V4's 10).
PUBLISHED_STEPS = {"muon": (5,), "polar-express": tuple(range(5, 11)), "you-6step": (6,)}
# "native": the set's own step count (a calibrated table: the count its entry runs, the chosen k).
FRONTIER_COLUMNS = [
    "shape",
    "table",
    "steps",
    "flops",
    "spectral_mean",
    f"spectral_p{round(REPORT_QUANTILE * 100)}",
    "native",
]


def frontier_frame(analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """One row per coefficient set × step count at the shape: FLOPs per call and the error there."""
    spectra = analysis.samples_for(shape).spectra
    rows = []
    for name, counts in PUBLISHED_STEPS.items():
        schedule = load_table(name).default_schedule
        native = schedule.num_steps
        rows += [_row(shape, name, k, sample_errors(spectra, schedule.with_steps(k)), native) for k in counts]
    for entrant, schedules in calibrated_points(analysis, shape).items():
        native = entrant.schedule(shape).num_steps
        rows += [
            _row(shape, entrant.label, k, sample_errors(spectra, s), native) for k, s in schedules.items()
        ]
    return pd.DataFrame(rows, columns=FRONTIER_COLUMNS)


def calibrated_points(analysis: Analysis, shape: ShapeKey) -> dict[Entrant, dict[int, Schedule]]:
    """Each analysed calibrated table with an entry for the shape → k → rows. Its frontier's rows where
    the entry records an auto search (only the k the search fitted), else its own count."""
    points: dict[Entrant, dict[int, Schedule]] = {}
    for entrant in analysis.entrants_for(shape):
        entry = entrant.table.entry(shape)
        if entrant.baseline or entry is None:
            continue
        search = entry.metrics.get("steps_search") or {}
        frontier = [p for p in search.get("frontier", []) if p.get("coefficients")]
        if frontier:
            scale = entrant.table.normalization.scale
            points[entrant] = {
                p["steps"]: Schedule(rows=tuple(map(tuple, p["coefficients"])), scale=scale, steps=p["steps"])
                for p in frontier
            }
        else:
            schedule = entrant.schedule(shape)
            points[entrant] = {schedule.num_steps: schedule}
    return points


def target_levels(analysis: Analysis, shape: ShapeKey) -> dict[str, float]:
    """Each analysed table's auto-search target at the shape, on these samples: "label: target" → error
    (a number as is; a named set's 5-step error measured here)."""
    spectra = analysis.samples_for(shape).spectra
    levels = {}
    for entrant in analysis.entrants_for(shape):
        entry = entrant.table.entry(shape)
        search = (entry.metrics.get("steps_search") if entry is not None else None) or {}
        if "target" not in search:
            continue
        target = str(search["target"])
        try:
            level = float(target)
        except ValueError:
            level = float(sample_errors(spectra, load_table(target).default_schedule).mean())
        levels[f"{entrant.label} target: {target}"] = level
    return levels


def frontier_report_frame(analysis: Analysis) -> pd.DataFrame:
    """Every analysed shape's frontier, for the report."""
    return pd.concat([frontier_frame(analysis, item.shape) for item in analysis.shapes], ignore_index=True)


def _row(shape: ShapeKey, label: str, steps: int, errors, native: int) -> dict:
    errors = errors.double()
    return {
        "shape": format_shape(shape),
        "table": label,
        "steps": steps,
        "flops": ns_matmul_flops(shape, steps),
        "spectral_mean": float(errors.mean()),
        FRONTIER_COLUMNS[-2]: float(errors.quantile(REPORT_QUANTILE)),
        "native": steps == native,
    }
