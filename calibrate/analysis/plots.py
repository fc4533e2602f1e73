"""Precision-vs-SVD figures: error vs iterations, the transfer curve P(σ), error over training.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so nothing depends on a display
or on the global backend (headless on a server; still shown inline in a notebook). Each ``plot_*``
function draws into a figure from :func:`new_figure` and returns the DataFrame it drew, taken from
``calibrate.analysis.precision``, the same numbers ``root-calibrate report`` prints.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from root_core.files import write_atomically

from ..errors import CalibrationError
from ..shapes import format_shape
from .precision import (
    BAND_QUANTILES,
    BF16,
    SPECTRAL,
    TRANSFER_SIGMA_MIN,
    Analysis,
    ShapeKey,
    has_training_steps,
    singular_values,
    summarize,
    training_frame,
    transfer_frame,
)

FORMATS = ("png", "svg", "pdf")
# 10 × 6 in at 110 dpi: a 1100 × 660 PNG, readable on a laptop screen and in a notebook cell.
FIGSIZE = (10.0, 6.0)
DPI = 110
KINDS = ("iterations", "transfer", "training", "flops")
# Histogram bins per decade of σ: fine enough to show a Marchenko–Pastur bulk, coarse enough to read.
BINS_PER_DECADE = 8
BAND_ALPHA = 0.15
CAPTION_STYLE = {"fontsize": 8, "color": "0.3"}
# Errors above this are off the error axes: an error of 1 is what returning zero would score, so larger
# values only say "diverged", and one diverging table (ROOT paper's triple past 7 steps reaches 1e12)
# would otherwise squash every other line into the bottom row.
ERROR_AXIS_MAX = 3.0
# Drawn values are capped here (far above the axis, so the cap never shows): matplotlib cannot fill a
# band up to an infinite error, which is what a diverged iteration reports.
DRAW_MAX = 1e3 * ERROR_AXIS_MAX
# plot draws its own samples (--samples, --count, --seed), never the calibration's: said under each figure.
PLOT_SAMPLES_NOTE = (
    "not the samples the table was calibrated on, so errors differ from its metrics (root-calibrate show)"
)
X_NAMES = {"steps": "step", "train_step": "training step"}
ERROR_LABEL = "relative error ‖NS(G) − UVᵀ‖_F / ‖UVᵀ‖_F (dimensionless, log scale)"
SIGMA_LABEL = "normalised singular value σ = σᵢ(G) / ‖G‖_F (log scale)"
# The transfer figure's P axis ends this far above the largest bound, so the bound line is visible.
TRANSFER_HEADROOM = 1.05
# The transfer figure's σ axis starts at the decade where a curve has risen this far (or a sample sits).
P_VISIBLE = 0.05


def new_figure() -> Figure:
    """A fixed-size figure (so every written image has the same pixel size), constrained layout."""
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _colors(analysis: Analysis) -> dict[str, str]:
    """One color per table, the same in every figure: analysed tables first, then baselines."""
    palette = [f"C{i}" for i in range(10)]
    return {e.label: palette[i % len(palette)] for i, e in enumerate(analysis.entrants)}


def _finish(fig: Figure, title: str, analysis: Analysis, shape: ShapeKey) -> None:
    fig.suptitle(f"{title} — {format_shape(shape)}", fontsize=12)
    # supxlabel, not fig.text: constrained layout reserves room for it, so it never overlaps an axis label.
    fig.supxlabel(f"{analysis.caption(shape)}\n{PLOT_SAMPLES_NOTE}", **CAPTION_STYLE)


# ---- 1. error vs iterations -------------------------------------------------------------------------


def plot_iterations(fig: Figure, analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """Mean error at 1…10 steps per table: float64 spectral (solid, band = middle 90% of samples) and
    measured bf16 (dashed); a star marks each table's own step count."""
    summary = summarize(analysis.frame)
    drawn = summary[summary["shape"] == format_shape(shape)].reset_index(drop=True)
    ax = fig.add_subplot()
    colors = _colors(analysis)
    low, high = (f"{SPECTRAL}_p{round(q * 100):02d}" for q in BAND_QUANTILES)
    for label, rows in drawn.groupby("table", sort=False):
        color = colors[label]
        rows = _capped(rows)
        ax.plot(rows["steps"], rows[f"{SPECTRAL}_mean"], "-o", color=color, label=label, markersize=4)
        ax.fill_between(rows["steps"], rows[low], rows[high], color=color, alpha=BAND_ALPHA, linewidth=0)
        ax.plot(rows["steps"], rows[f"{BF16}_mean"], "--", color=color, marker="x", markersize=5)
        native = rows[rows["native"]]
        ax.plot(native["steps"], native[f"{SPECTRAL}_mean"], "*", color=color, markersize=14, mec="k")
    _error_axis(ax, drawn, "steps", [f"{SPECTRAL}_mean", f"{BF16}_mean", high])
    ax.set_xticks(sorted(drawn["steps"].unique()))
    ax.set_xlabel("Newton–Schulz iterations (steps)")
    _legends(ax, _style_handles(analysis.checked(shape), len(analysis.samples_for(shape).samples)))
    _finish(fig, "Error vs iterations against the exact polar factor (SVD)", analysis, shape)
    return drawn


def _capped(rows: pd.DataFrame) -> pd.DataFrame:
    """What is drawn: errors capped at DRAW_MAX (the returned frame keeps the true values)."""
    numeric = rows.select_dtypes("float").columns
    return rows.assign(**{column: rows[column].clip(upper=DRAW_MAX) for column in numeric})


def _style_handles(checked: int, total: int, band: bool = True) -> list[Line2D]:
    p05, p95 = (round(q * 100) for q in BAND_QUANTILES)
    spread = f" (band: p{p05:02d}–p{p95} of samples)" if band else ""
    subset = "" if checked == total else f" on {checked} of {total} samples"
    handles = [
        Line2D([], [], color="0.3", ls="-", marker="o", ms=4, label=f"float64, from the spectrum{spread}"),
        Line2D([], [], color="0.3", ls="--", marker="x", label=f"bf16 matrix iteration, measured{subset}"),
    ]
    if band:
        handles.append(Line2D([], [], color="0.3", ls="", marker="*", ms=12, mec="k", label="own step count"))
    return handles


def _legends(ax: Axes, styles: list[Line2D]) -> None:
    tables = ax.legend(title="table (name@version)", loc="lower left", fontsize=9)
    ax.add_artist(tables)
    ax.legend(handles=styles, loc="upper right", fontsize=8)


def _error_axis(ax: Axes, drawn: pd.DataFrame, x: str, columns: list[str]) -> None:
    """Log error axis capped at ERROR_AXIS_MAX, naming the tables and x values that run off it."""
    ax.set_yscale("log")
    ax.set_ylabel(ERROR_LABEL)
    ax.grid(True, which="both", alpha=0.3)
    values = drawn[columns].to_numpy(dtype=float)
    if np.nanmax(values) <= ERROR_AXIS_MAX:
        return
    low = np.nanmin(values[values > 0])
    ax.set_ylim(low / 1.5, ERROR_AXIS_MAX)
    off = drawn[(values > ERROR_AXIS_MAX).any(axis=1)]
    notes = []
    for label, rows in off.groupby("table", sort=False):
        worst = np.nanmax(rows[columns].to_numpy(float))
        notes.append(f"{label} from {X_NAMES[x]} {int(rows[x].min())} (up to {worst:.1e})")
    # A title, not a text in the axes: it can never sit on top of a legend or a line.
    ax.set_title(
        f"off scale (error > {ERROR_AXIS_MAX:g}): " + "; ".join(notes), fontsize=8, color="firebrick"
    )


# ---- 2. transfer curve ------------------------------------------------------------------------------


def plot_transfer(fig: Figure, analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """P(σ) per table on a log-σ axis with the target 1 and the calibration bound; below it, where the
    samples' singular values sit. P is linear from 0 to just above the bound (a log P axis made curves
    that wiggle around 1 unreadable), and the legend sits outside the axes, so it hides no curve or bound."""
    drawn = transfer_frame(analysis, shape)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    colors = _colors(analysis)
    for label, rows in drawn.groupby("table", sort=False):
        steps = int(rows["steps"].iloc[0])
        top.plot(rows["sigma"], rows["P"], color=colors[label], label=f"{label}, {steps} steps", lw=1.1)
    top.axhline(1.0, color="k", ls=":", lw=1.2, label="target P(σ) = 1 (exact polar factor)")
    _bounds(top, drawn)
    sigma = singular_values(analysis, shape)
    top.set_xscale("log")
    top.set_xlim(_sigma_axis_start(drawn, sigma), 1.0)
    _transfer_ylim(top, drawn)
    top.set_ylabel("composed polynomial P(σ) (dimensionless)")
    top.grid(True, which="major", alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    _histogram(bottom, sigma)
    _finish(fig, "Transfer curve σ ↦ P(σ) and the samples' spectrum", analysis, shape)
    return drawn


def _sigma_axis_start(drawn: pd.DataFrame, sigma: np.ndarray) -> float:
    """The decade below both the smallest sample σ and the σ where some P first reaches P_VISIBLE: the
    decades left of it hold only flat zero curves and no samples, and would squeeze the rest."""
    risen = drawn.loc[drawn["P"] >= P_VISIBLE, "sigma"]
    positive = sigma[sigma > 0]
    candidates = [float(risen.min())] if not risen.empty else []
    candidates += [float(positive.min())] if positive.size else []
    if not candidates:
        return TRANSFER_SIGMA_MIN
    return max(TRANSFER_SIGMA_MIN, 10.0 ** math.floor(math.log10(min(candidates))))


def _bounds(ax: Axes, drawn: pd.DataFrame) -> None:
    """The bound each table was calibrated under (its metrics' max_gain, else the default)."""
    gains = drawn.groupby("max_gain", sort=True)["table"].unique()
    for gain, tables in gains.items():
        whose = "" if len(gains) == 1 else f": {', '.join(tables)}"
        ax.axhline(gain, color="firebrick", ls="--", lw=1.0, label=f"bound max_gain = {gain:g}{whose}")


def _transfer_ylim(ax: Axes, drawn: pd.DataFrame) -> None:
    """Linear P from 0 to just above the largest bound, so curves near 1 stay readable; a table whose P
    runs above that is named in the title with its maximum, never silently cut."""
    top = TRANSFER_HEADROOM * float(drawn["max_gain"].max())
    ax.set_ylim(min(0.0, float(drawn["P"].min())), top)
    peaks = drawn.groupby("table", sort=False)["P"].max()
    off = [f"{label} (up to {peak:.3g})" for label, peak in peaks.items() if peak > top]
    if off:
        ax.set_title(f"off scale (P > {top:.3g}): " + "; ".join(off), fontsize=8, color="firebrick")


def _histogram(ax: Axes, sigma: np.ndarray) -> None:
    decades = round(-math.log10(TRANSFER_SIGMA_MIN))
    bins = np.logspace(-decades, 0.0, decades * BINS_PER_DECADE + 1)
    # Values below the axis (a zero singular value of a rank-deficient sample) land in the first bin.
    ax.hist(np.clip(sigma, bins[0], bins[-1]), bins=bins, color="0.55", edgecolor="white", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(SIGMA_LABEL)
    ax.set_ylabel("count of σ\n(all samples)")
    ax.grid(True, which="major", alpha=0.3)


# ---- 3. error over training -------------------------------------------------------------------------


def plot_training(fig: Figure, analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """Error at each table's own step count per recorded training step (the ROOT paper's figure form)."""
    drawn = training_frame(analysis, shape)
    ax = fig.add_subplot()
    colors = _colors(analysis)
    for label, rows in drawn.groupby("table", sort=False):
        rows = _capped(rows)
        ax.plot(rows["train_step"], rows[SPECTRAL], "-o", color=colors[label], label=label, markersize=4)
        ax.plot(rows["train_step"], rows[BF16], "--x", color=colors[label], markersize=5)
    _error_axis(ax, drawn, "train_step", [SPECTRAL, BF16])
    ax.set_xlabel("training step at which the momentum was recorded (optimizer steps)")
    checked, total = analysis.checked(shape), len(analysis.samples_for(shape).samples)
    _legends(ax, _style_handles(checked, total, band=False))
    _finish(fig, "Error over training, at each table's own step count", analysis, shape)
    return drawn


# ---- 4. error vs cost --------------------------------------------------------------------------------


def plot_flops(fig: Figure, analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """Mean float64 error against matmul FLOPs per Newton–Schulz call (calibrate.analysis.frontier): each
    set's points at its step counts, labelled with k, a star at the count it runs (an auto table: the chosen
    k), and each auto table's target as a dotted line."""
    from .frontier import frontier_frame, target_levels  # frontier imports precision, as plots does

    drawn = frontier_frame(analysis, shape)
    ax = fig.add_subplot()
    colors = {label: f"C{i % 10}" for i, label in enumerate(drawn["table"].unique())}
    for label, rows in drawn.groupby("table", sort=False):
        rows = _capped(rows.sort_values("steps"))
        ax.plot(rows["flops"], rows["spectral_mean"], "-o", color=colors[label], label=label, markersize=5)
        native = rows[rows["native"]]
        ax.plot(native["flops"], native["spectral_mean"], "*", color=colors[label], markersize=14, mec="k")
        for point in rows.itertuples():
            ax.annotate(
                f"{point.steps}",
                (point.flops, point.spectral_mean),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colors[label],
            )
    for i, (label, level) in enumerate(target_levels(analysis, shape).items()):
        ax.axhline(level, color="k", ls=(0, (1, 2 + i)), lw=1.2, label=f"{label} ({level:.3g} here)")
    ax.set_xscale("log")
    _error_axis(ax, drawn, "steps", ["spectral_mean"])
    ax.set_xlabel("matmul FLOPs per Newton–Schulz call, steps·(4m²n + 2m³) (log scale; labels: steps)")
    ax.legend(title="coefficient set (float64, from the spectrum)", loc="upper right", fontsize=8)
    _finish(fig, "Error vs cost per Newton–Schulz call", analysis, shape)
    return drawn


PLOTTERS = {
    "iterations": plot_iterations,
    "transfer": plot_transfer,
    "training": plot_training,
    "flops": plot_flops,
}


# ---- writing ----------------------------------------------------------------------------------------


def figure_kinds(analysis: Analysis, shape: ShapeKey) -> list[str]:
    """The training figure only where the samples are a training time series (a harvest)."""
    return [k for k in KINDS if k != "training" or has_training_steps(analysis, shape)]


def figure_path(out: Path, shape: ShapeKey, kind: str, fmt: str) -> Path:
    return out / f"precision_{format_shape(shape)}_{kind}.{fmt}"


def write_figures(analysis: Analysis, out: Path, fmt: str = "png") -> list[Path]:
    """Render every figure in memory first, then write each atomically: a failed render writes nothing."""
    if fmt not in FORMATS:
        raise CalibrationError(f"invalid --format '{fmt}': expected one of {', '.join(FORMATS)}")
    pending: list[tuple[Path, bytes]] = []
    for item in analysis.shapes:
        for kind in figure_kinds(analysis, item.shape):
            fig = new_figure()
            PLOTTERS[kind](fig, analysis, item.shape)
            pending.append((figure_path(out, item.shape, kind, fmt), _render(fig, fmt)))
    out.mkdir(parents=True, exist_ok=True)
    return [write_atomically(target, image) for target, image in pending]


def _render(fig: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI)
    return buffer.getvalue()
