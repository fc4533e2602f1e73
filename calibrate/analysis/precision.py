"""How close each coefficient table gets to the exact polar factor: the numbers behind figures and reports.

One function, :func:`analyse`, computes them: per shape × table × Newton–Schulz steps 1…10, the float64
spectral error of every sample (docs/design.md §1, from its normalised spectrum) and the measured bf16
error of the real matrix iteration against an SVD-exact polar factor. ``root-calibrate plot`` and
``root-calibrate report`` both read the frame it returns, so the pictures and the tables cannot disagree.

Samples are clipped like the optimizer clips them (docs/design.md §1: NS sees the soft-thresholded momentum),
at the clip quantile recorded in the analysed table's provenance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from root_core.newton_schulz import newton_schulz, orthogonalize
from root_core.schedule import Schedule
from root_core.spectral import compose, composition_range
from root_core.tables import (
    BASELINE_TABLES,
    CoefficientTable,
    TableError,
    TableNotFoundError,
    load_table,
)

from ..errors import CalibrationError
from ..evaluate import polar_factor, relative_matrix_error
from ..fitting.objective import DEFAULT_MAX_GAIN, sample_errors
from ..sampling import Sample
from ..sampling.harvest import HARVEST_FORMAT, harvest, load_harvest
from ..sampling.real import load_real_samples
from ..sampling.synthetic import synthetic_samples
from ..shapes import format_shape, parse_shapes
from ..spectra import clipped, normalized_spectrum

ShapeKey = tuple[int, int]
Advance = Callable[[int], None]

# Steps 1…10: past Muon's 5 and Polar Express's 5, far enough to see a set converge, stall or blow up.
MAX_STEPS = 10
DEFAULT_BASELINES = BASELINE_TABLES
# ROOT's default outlier_quantile; used when a table does not record the quantile it was calibrated at.
DEFAULT_CLIP_QUANTILE = 0.9
SAMPLE_SOURCES = ("synthetic", "harvest")
DEFAULT_COUNT = 8
# The bf16 matrix check runs every sample by default, so solid and dashed lines average the same
# matrices; at large shapes on a CPU (~5 s per step at 4096x11008) pass a smaller check_samples.
DEFAULT_CHECK_SAMPLES: int | None = None
# The shaded band: the middle 90% of samples. Its upper edge is the report's p95.
BAND_QUANTILES = (0.05, 0.95)
REPORT_QUANTILE = BAND_QUANTILES[1]
# Transfer curve: P on a log grid over (1e-6, 1]. A degree-5^K composition has narrow spikes, so the
# grid is dense; the exact maximum over (0, 1] (the "bound" column) comes from composition_range.
TRANSFER_SIGMA_MIN = 1e-6
TRANSFER_POINTS = 4001
MATRIX_DTYPE = torch.bfloat16

# Long-form columns: one row per shape × table × steps × sample.
SAMPLE_COLUMNS = ("shape", "table", "baseline", "steps", "native", "sample", "source", "kind", "train_step")
SPECTRAL = "spectral"  # float64 spectral error (docs/design.md §1)
BF16 = "bf16"  # measured bf16 matrix error, NaN on samples not checked


@dataclass(frozen=True)
class Entrant:
    """One coefficient set in the comparison: a table, its label and whether it is a baseline."""

    table: CoefficientTable
    label: str
    baseline: bool = False

    def schedule(self, shape: ShapeKey) -> Schedule:
        # Shapes are checked before any work (check_shapes), so "default" here never warns on a
        # table that lists shapes; entry-less tables (Muon, Polar Express) fit every shape.
        return self.table.schedule_for(shape, missing="default")

    def covers(self, shape: ShapeKey) -> bool:
        return not self.table.entries or self.table.entry(shape) is not None

    def max_gain(self, shape: ShapeKey) -> float:
        """The bound the table was calibrated under (its metrics), else the calibration default."""
        entry = self.table.entry(shape)
        value = (entry.metrics if entry is not None else {}).get("max_gain")
        return float(value) if isinstance(value, (int, float)) else DEFAULT_MAX_GAIN


@dataclass(frozen=True)
class ShapeSamples:
    """A shape's samples and their normalised spectra (of the clipped matrices, float64)."""

    shape: ShapeKey
    samples: list[Sample]
    spectra: Tensor  # (samples, r), descending per row
    source: str
    clip_quantile: float | None

    @property
    def counts(self) -> tuple[int, int]:
        real = sum(sample.kind == "real" for sample in self.samples)
        return real, len(self.samples) - real

    @property
    def train_steps(self) -> list[int | None]:
        return [sample.meta.get("step") if sample.kind == "real" else None for sample in self.samples]

    def caption(self, checked: int) -> str:
        real, synthetic = self.counts
        clip = "not clipped" if self.clip_quantile is None else f"clipped at q={self.clip_quantile:g}"
        return (
            f"shape {format_shape(self.shape)} · {len(self.samples)} samples from {self.source} "
            f"(real:synthetic = {real}:{synthetic}), {clip} as in ROOT · bf16 iteration measured on "
            f"{checked} of them"
        )


@dataclass(frozen=True)
class Analysis:
    entrants: list[Entrant]
    shapes: list[ShapeSamples]
    frame: pd.DataFrame  # SAMPLE_COLUMNS + SPECTRAL + BF16
    check_samples: int

    def samples_for(self, shape: ShapeKey) -> ShapeSamples:
        for item in self.shapes:
            if item.shape == shape:
                return item
        raise CalibrationError(f"shape {format_shape(shape)} was not analysed")

    def entrants_for(self, shape: ShapeKey) -> list[Entrant]:
        return [entrant for entrant in self.entrants if entrant.covers(shape)]

    def checked(self, shape: ShapeKey) -> int:
        """How many of the shape's samples the bf16 matrix iteration measured."""
        return len(bf16_checked(self.samples_for(shape).samples, self.check_samples))

    def caption(self, shape: ShapeKey) -> str:
        return self.samples_for(shape).caption(self.checked(shape))


# ---- inputs: tables, baselines, shapes, samples -----------------------------------------------------


def load_entrants(tables: Sequence[str], against: Sequence[str]) -> list[Entrant]:
    """The analysed tables first, then the baselines not already among them; labels are name@version."""
    if not tables:
        raise CalibrationError("give at least one TABLE (a name such as muon, name@N, or a .json path)")
    entrants = [Entrant(_load(spec, "table"), "") for spec in tables]
    entrants += [Entrant(_load(spec, "baseline"), "", baseline=True) for spec in against]
    unique: dict[str, Entrant] = {}
    for entrant in entrants:
        unique.setdefault(entrant.table.content_hash, entrant)
    return _labelled(list(unique.values()))


def _load(spec: str, role: str) -> CoefficientTable:
    try:
        return load_table(spec)
    except TableNotFoundError as error:
        raise CalibrationError(f"unknown {role} '{spec}': {error}") from None
    except TableError as error:
        raise CalibrationError(f"cannot load {role} '{spec}': {error}") from None


def _labelled(entrants: list[Entrant]) -> list[Entrant]:
    """name@version, or the identity (with the content hash) where two different tables share it."""
    short = [f"{e.table.name}@{e.table.version}" for e in entrants]
    return [
        Entrant(e.table, label if short.count(label) == 1 else e.table.identity, e.baseline)
        for e, label in zip(entrants, short, strict=True)
    ]


def parse_baselines(text: str) -> list[str]:
    """``"muon,polar-express"`` → names; ``""`` or ``"none"`` → no baselines."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if names == ["none"] else names


def resolve_shapes(entrants: Sequence[Entrant], shapes: str | None) -> list[ShapeKey]:
    """``--shapes``, else the shapes every analysed table lists; each must be in every analysed table."""
    analysed = [e for e in entrants if not e.baseline]
    if shapes is not None:
        keys = parse_shapes(shapes)
    else:
        listed = [e for e in analysed if e.table.entries]
        if not listed:
            names = ", ".join(e.label for e in analysed)
            raise CalibrationError(f"table {names} lists no shapes; pass --shapes, e.g. 1024x4096")
        keys = [key for key in listed[0].table.shapes if all(e.covers(key) for e in listed)]
        if not keys:
            raise CalibrationError(
                f"tables {', '.join(e.label for e in listed)} share no shape; pass --shapes"
            )
    check_shapes(analysed, keys)
    return keys


def check_shapes(analysed: Sequence[Entrant], keys: Sequence[ShapeKey]) -> None:
    """A shape an analysed table does not list would silently show its default rows: refuse it."""
    for entrant in analysed:
        for key in keys:
            if not entrant.covers(key):
                listed = ", ".join(format_shape(s) for s in entrant.table.shapes)
                raise CalibrationError(
                    f"shape {format_shape(key)} is not in table {entrant.label} (it lists {listed})"
                )


def clip_quantile_for(entrants: Sequence[Entrant]) -> float | None:
    """The first analysed table's recorded clip quantile (``None`` = not clipped), else ROOT's 0.9."""
    for entrant in entrants:
        if not entrant.baseline and "clip_quantile" in entrant.table.provenance:
            value = entrant.table.provenance["clip_quantile"]
            return None if value is None else float(value)
    return DEFAULT_CLIP_QUANTILE


def check_source(source: str) -> None:
    if source not in SAMPLE_SOURCES and not Path(source).exists():
        raise CalibrationError(
            f"invalid --samples '{source}': expected {' or '.join(SAMPLE_SOURCES)}, or an existing path"
        )


def load_samples(
    shape: ShapeKey, source: str, count: int, *, seed: int, harvest_steps: int | None = None
) -> list[Sample]:
    """``count`` samples of ``shape``: synthetic families, a fresh harvest, or a file/folder (spread)."""
    if source == "synthetic":
        return synthetic_samples(shape, count, seed=seed)
    if source == "harvest":
        return harvest(shape, count, seed=seed, steps=harvest_steps)
    found = [s for s in _file_samples(Path(source), shape) if s.shape == shape]
    if not found:
        raise CalibrationError(f"no {format_shape(shape)} matrices in --samples '{source}'")
    return [found[i] for i in _spread(len(found), count)]


def _file_samples(path: Path, shape: ShapeKey) -> list[Sample]:
    if path.is_file() and _is_harvest_file(path):
        return load_harvest(path)  # keeps the training step of each sample, for the training figure
    return load_real_samples([path], [shape])[shape]


def _is_harvest_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == HARVEST_FORMAT
    except Exception:  # not a safetensors file: the general loader reports what it is
        return False


def _spread(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``total`` (over a training run's recorded steps, say)."""
    if total <= count:
        return list(range(total))
    return [int(i * total / count) for i in range(count)]


def shape_samples(
    shape: ShapeKey, samples: list[Sample], *, source: str, clip_quantile: float | None, device="cpu"
) -> ShapeSamples:
    spectra = torch.stack([_spectrum(s, clip_quantile, device) for s in samples])
    return ShapeSamples(shape, samples, spectra, source, clip_quantile)


def _spectrum(sample: Sample, clip_quantile: float | None, device: str) -> Tensor:
    """A sample's normalised spectrum; a recorded one (sampling/recorded.py) as ROOT clipped it."""
    if not sample.has_matrix:
        return sample.spectrum
    return normalized_spectrum(sample.matrix, clip_quantile=clip_quantile, device=device)


def bf16_checked(samples: Sequence[Sample], check_samples: int) -> list[int]:
    """Indices of the samples the bf16 iteration runs on: ``check_samples`` spread evenly over them, less
    recorded spectra, which have no matrix to iterate (their spectral errors are still drawn)."""
    return [i for i in _spread(len(samples), check_samples) if samples[i].has_matrix]


# ---- the numbers ------------------------------------------------------------------------------------


def analyse(
    tables: Sequence[str],
    *,
    against: Sequence[str] = DEFAULT_BASELINES,
    shapes: str | None = None,
    source: str = "synthetic",
    count: int = DEFAULT_COUNT,
    check_samples: int | None = DEFAULT_CHECK_SAMPLES,
    seed: int = 0,
    harvest_steps: int | None = None,
    device: str = "cpu",
    stage: Callable[[str, int], object] | None = None,
) -> Analysis:
    """Load tables and samples, then measure every table on every shape (see :func:`measure`).

    ``stage(description, total)`` may return a context manager yielding an ``advance`` callback (the
    CLI's progress bars); all argument checks run before any sample is drawn.
    """
    check_samples = count if check_samples is None else check_samples
    _check_counts(count, check_samples)
    check_source(source)
    entrants = load_entrants(tables, against)
    keys = resolve_shapes(entrants, shapes)
    clip = clip_quantile_for(entrants)
    measured = []
    for key in keys:
        with _stage(stage, f"{format_shape(key)} samples ({source})", 1) as advance:
            samples = load_samples(key, source, count, seed=seed, harvest_steps=harvest_steps)
            item = shape_samples(key, samples, source=source, clip_quantile=clip, device=device)
            advance(1)
        measured.append(item)
    frames = []
    for item in measured:
        covering = [e for e in entrants if e.covers(item.shape)]
        checked = len(bf16_checked(item.samples, check_samples))
        with _stage(stage, f"{format_shape(item.shape)} bf16 iteration vs SVD", checked) as advance:
            frames.append(measure(covering, item, check_samples, device=device, advance=advance))
    return Analysis(entrants, measured, pd.concat(frames, ignore_index=True), check_samples)


def _check_counts(count: int, check_samples: int) -> None:
    if count < 1:
        raise CalibrationError(f"invalid --count {count}: expected an integer ≥ 1")
    if check_samples < 0:
        raise CalibrationError(f"invalid --check-samples {check_samples}: expected an integer ≥ 0")


class _NoStage:
    def __enter__(self) -> Advance:
        return lambda advance=1: None

    def __exit__(self, *exc: object) -> None:
        return None


def _stage(stage: Callable[[str, int], object] | None, description: str, total: int):
    return _NoStage() if stage is None else stage(description, total)


def measure(
    entrants: Sequence[Entrant],
    item: ShapeSamples,
    check_samples: int,
    *,
    device: str = "cpu",
    advance: Advance | None = None,
) -> pd.DataFrame:
    """Long frame: spectral float64 error of every sample and bf16 matrix error of ``check_samples``
    of them (evenly spread), for each entrant at 1…MAX_STEPS steps."""
    checked = bf16_checked(item.samples, check_samples)
    bf16 = {label: np.full((len(item.samples), MAX_STEPS), np.nan) for label in _labels(entrants)}
    for index in checked:
        B = _clipped(item.samples[index].matrix, item.clip_quantile, device)
        polar = polar_factor(B)
        for entrant in entrants:
            bf16[entrant.label][index] = bf16_errors_by_step(B, polar, entrant.schedule(item.shape))
        if advance is not None:
            advance(1)
    rows = [_rows(entrant, item, bf16[entrant.label]) for entrant in entrants]
    return pd.concat(rows, ignore_index=True)


def _labels(entrants: Sequence[Entrant]) -> list[str]:
    return [entrant.label for entrant in entrants]


def _clipped(matrix: Tensor, clip_quantile: float | None, device: str) -> Tensor:
    return clipped(matrix.to(torch.float32), clip_quantile, device)


def bf16_errors_by_step(B: Tensor, polar: Tensor, schedule: Schedule, steps: int = MAX_STEPS) -> list[float]:
    """Relative error after each of 1…steps bf16 iterations, from one run instead of one run per count.

    Step k of a K-step run equals the k-step run bit for bit (same rows, same ops, bf16 values carried
    through a lossless float32 cast), so this is ``evaluate.matrix_errors`` at every k for 1/5.5 of the
    work at 10 steps. ``B`` is wide, as samples are.
    """
    rows = schedule.expanded(steps)
    first = Schedule(rows=rows[:1], scale=schedule.scale, steps=1)
    X = orthogonalize(B, first, dtype=MATRIX_DTYPE).to(MATRIX_DTYPE)
    errors = [relative_matrix_error(X, polar)]
    for row in rows[1:]:
        X = newton_schulz(X, [row])
        errors.append(relative_matrix_error(X, polar))
    return [_diverged_as_inf(error) for error in errors]


def _diverged_as_inf(error: float) -> float:
    """bf16 overflow gives inf − inf = NaN; count it as an infinite error, never as a missing value
    (pandas means skip NaN, which would hide the divergence)."""
    return error if math.isfinite(error) else math.inf


def _rows(entrant: Entrant, item: ShapeSamples, bf16: np.ndarray) -> pd.DataFrame:
    schedule = entrant.schedule(item.shape)
    spectral = torch.stack([sample_errors(item.spectra, schedule.with_steps(k)) for k in _steps()], dim=1)
    spectral = spectral.masked_fill(spectral.isnan(), math.inf)  # as in _diverged_as_inf
    n = len(item.samples)
    return pd.DataFrame(
        {
            "shape": format_shape(item.shape),
            "table": entrant.label,
            "baseline": entrant.baseline,
            "steps": np.tile(_steps(), n),
            "native": np.tile([k == schedule.num_steps for k in _steps()], n),
            "sample": np.repeat(np.arange(n), MAX_STEPS),
            "source": np.repeat([s.source for s in item.samples], MAX_STEPS),
            "kind": np.repeat([s.kind for s in item.samples], MAX_STEPS),
            "train_step": np.repeat(_float_steps(item.train_steps), MAX_STEPS),
            SPECTRAL: spectral.numpy().reshape(-1),
            BF16: bf16.reshape(-1),
        }
    )


def _steps() -> list[int]:
    return list(range(1, MAX_STEPS + 1))


def _float_steps(steps: list[int | None]) -> np.ndarray:
    return np.array([math.nan if s is None else float(s) for s in steps])


# ---- summaries: what the figures draw and the report prints ------------------------------------------


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and band (5%, 95% of samples) per shape × table × steps, for both error kinds."""
    low, high = BAND_QUANTILES
    grouped = frame.groupby(["shape", "table", "steps"], sort=False)
    stats = {}
    for column in (SPECTRAL, BF16):
        stats[f"{column}_mean"] = grouped[column].mean()
        stats[f"{column}_p{round(low * 100):02d}"] = grouped[column].agg(_quantile, low)
        stats[f"{column}_p{round(high * 100)}"] = grouped[column].agg(_quantile, high)
    stats["native"] = grouped["native"].first()
    stats["baseline"] = grouped["baseline"].first()
    return pd.DataFrame(stats).reset_index()


def _quantile(values: pd.Series, q: float) -> float:
    """Linear-interpolated quantile of the measured values (NaN = not measured), where interpolating
    between two infinite (diverged) errors gives inf, not inf − inf = NaN."""
    measured = values.dropna()
    if measured.empty:
        return math.nan
    with np.errstate(invalid="ignore"):  # the inf − inf case, handled on the next line
        result = float(np.quantile(measured.to_numpy(), q))
    return math.inf if math.isnan(result) else result


def report_frame(analysis: Analysis) -> pd.DataFrame:
    """Per shape × table at the table's own step count: mean / p95 errors, bound, ratios to baselines."""
    summary = summarize(analysis.frame)
    native = summary[summary["native"]].drop(columns=["native"]).reset_index(drop=True)
    p95 = f"p{round(REPORT_QUANTILE * 100)}"
    columns = ["shape", "table", "steps", f"{SPECTRAL}_mean", f"{SPECTRAL}_{p95}", f"{BF16}_mean"]
    report = native[[*columns, f"{BF16}_{p95}"]].copy()
    bounds = [_bound(analysis, row.shape, row.table) for row in native.itertuples()]
    report["bound"] = [high for high, _ in bounds]
    report["max_gain"] = [gain for _, gain in bounds]
    for baseline in [e for e in analysis.entrants if e.baseline]:
        if any(baseline.covers(item.shape) for item in analysis.shapes):  # else an all-NaN column
            report[f"ratio_vs_{baseline.label}"] = _ratios(report, baseline.label)
    return report


def _bound(analysis: Analysis, shape: str, label: str) -> tuple[float, float]:
    """max P on (0, 1] at the table's own steps (exact, docs/design.md §1.4) and the bound it was fitted
    under."""
    key = parse_shapes(shape)[0]
    entrant = next(e for e in analysis.entrants if e.label == label)
    _, high = composition_range(entrant.schedule(key))
    return high, entrant.max_gain(key)


def _ratios(report: pd.DataFrame, baseline: str) -> list[float]:
    """Mean spectral error over the baseline's, each at its own steps; NaN where the baseline is absent."""
    reference = report[report["table"] == baseline].set_index("shape")[f"{SPECTRAL}_mean"]
    return [
        row[f"{SPECTRAL}_mean"] / reference[row["shape"]] if row["shape"] in reference.index else math.nan
        for _, row in report.iterrows()
    ]


def transfer_frame(analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """σ ↦ P(σ) at each table's own step count on a log grid over (1e-6, 1], with each table's bound."""
    sigma = torch.logspace(math.log10(TRANSFER_SIGMA_MIN), 0.0, TRANSFER_POINTS, dtype=torch.float64)
    frames = []
    for entrant in analysis.entrants_for(shape):
        schedule = entrant.schedule(shape)
        frames.append(
            pd.DataFrame(
                {
                    "table": entrant.label,
                    "steps": schedule.num_steps,
                    "sigma": sigma.numpy(),
                    "P": compose(sigma, schedule).numpy(),
                    "max_gain": entrant.max_gain(shape),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def singular_values(analysis: Analysis, shape: ShapeKey) -> np.ndarray:
    """Every sample's normalised singular values, flattened (the histogram under the transfer curve)."""
    return analysis.samples_for(shape).spectra.reshape(-1).numpy()


def has_training_steps(analysis: Analysis, shape: ShapeKey) -> bool:
    return any(step is not None for step in analysis.samples_for(shape).train_steps)


def training_frame(analysis: Analysis, shape: ShapeKey) -> pd.DataFrame:
    """Error at each table's own step count per recorded training step (mean over that step's layers)."""
    if not has_training_steps(analysis, shape):
        raise CalibrationError(
            f"the {format_shape(shape)} samples carry no training step; use --samples harvest or a "
            "harvest file for the error-over-training figure"
        )
    frame = analysis.frame
    rows = frame[(frame["shape"] == format_shape(shape)) & frame["native"] & frame["train_step"].notna()]
    grouped = rows.groupby(["table", "train_step"], sort=False)
    result = grouped[[SPECTRAL, BF16]].mean().reset_index()
    return result.astype({"train_step": int})
