"""``root-calibrate report TABLE --real PATH``: a table against Muon and Polar Express on the user's momentum.

The user's matrices go through the table's own soft-threshold (its recorded clip quantile), and each shape
gets the float64 spectral error of the table's rows, Muon's and Polar Express's (mean and p95 over the
matrices), plus a float32 matrix check where the shape is small enough to afford it on a CPU. The report
also says where the momentum is deeper-tailed than anything the table was calibrated or stress-tested on
(the tail statistics a calibrated entry records, issue 10): there a fitted table may lose to Polar Express,
which keeps small singular values by design (a minimax fit on [1e-3, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from root_core.recording import is_recording
from root_core.schedule import Schedule
from root_core.tables import CoefficientTable, TableError, load_table

from ..errors import CalibrationError
from ..evaluate import matrix_errors
from ..fitting.objective import sample_errors, stack_spectra, tail_statistics
from ..sampling import real
from ..sampling.recorded import read_spectra
from ..shapes import format_shape
from ..spectra import clipped, normalized_spectrum

# The baselines every table is scored against (bundled tables, docs/design.md §2).
REAL_BASELINES = ("muon", "polar-express")
# ROOT's soft-threshold quantile: the clip for tables that record none (the bundled baselines).
DEFAULT_CLIP_QUANTILE = 0.9
# The float32 matrix check runs where m·n is at most this (1024×4096): there the polar factor and five
# float32 NS steps per schedule take about a second on a 2-core CPU; above it the spectral error (which
# the float32 iteration matches to ~1e-5 on clipped momentum) has to do.
MATRIX_CHECK_MAX_ELEMENTS = 1024 * 4096
# Matrices per shape that the float32 check runs on: the first few, which is enough to see a dtype effect.
MATRIX_CHECK_SAMPLES = 4
FLAG = "--real-is-momentum"
REAL_TITLE = (
    "Relative error vs the exact polar factor (SVD) on your momentum, clipped at each table's quantile "
    "(ROOT recordings: as ROOT clipped them); "
    "spectral = float64 from the spectrum, float32 = measured matrix iteration (shapes up to 1024x4096); "
    "tail = share of σ below 1e-3·σ_max and lowest σ/σ_max, deepest matrix"
)


# The per-step table of recorded (or harvested) momentum: the error over training, each set at its own steps.
STEPS_TITLE = (
    "Error over training: spectral mean per recorded training step (ROOT recordings, harvest files), "
    "each set at its own step count"
)
STEP_COLUMNS = ["shape", "step", "table", "samples", "spectral_mean", "ratio_vs_polar-express"]


@dataclass
class RealReport:
    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    steps: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=STEP_COLUMNS))


def real_report(
    table_spec: str,
    paths: Sequence[Path],
    *,
    is_momentum: bool = False,
    device: str = "cpu",
) -> RealReport:
    """One row per (shape, schedule): the table's rows, then Muon's and Polar Express's, on the files."""
    table = _load(table_spec)
    label = f"{table.name}@{table.version}"
    clip = table.provenance.get("clip_quantile", DEFAULT_CLIP_QUANTILE)
    found = matrix_shapes(paths)
    covered = [key for key in found if not table.entries or key in table.shapes]
    warnings = [
        f"{format_shape(key)}: in the files but not in {label}; its default rows (Muon's) would serve it"
        for key in found
        if key not in covered
    ]
    samples = real.load_real_samples(paths, covered, is_momentum=is_momentum, flag=FLAG) if covered else {}
    rows, step_rows = [], []
    for key in covered:
        shape_samples = samples.get(key, [])
        if not shape_samples:
            continue
        spectra = stack_spectra([_spectrum(s, clip, device) for s in shape_samples])
        schedules = {label: table.schedule_for(key), **_baselines(key)}
        matrices = [clipped(s.matrix, _clip_of(s, clip), device) for s in shape_samples if s.has_matrix]
        checked = _float32_check(key, matrices, schedules, device)
        tails = tail_statistics(spectra)
        rows += _rows(key, spectra, schedules, checked, tails)
        step_rows += _step_rows(key, shape_samples, spectra, schedules)
        warning = deep_tail_warning(key, tails, table, label)
        if warning:
            warnings.append(warning)
    if not found:
        raise CalibrationError(f"no 2-D or conv tensors in --real {', '.join(map(str, paths))}")
    return RealReport(
        frame=pd.DataFrame(rows, columns=COLUMNS),
        warnings=warnings,
        steps=pd.DataFrame(step_rows, columns=STEP_COLUMNS),
    )


def _clip_of(sample, clip: float | None) -> float | None:
    """The clip of a sample: a recorded one's from its recording (what NS saw), else the table's."""
    return sample.meta["clip_quantile"] if "recorded_table" in sample.meta else clip


def _spectrum(sample, clip: float | None, device: str):
    """The normalised spectrum: recorded (sampling/recorded.py), or of the matrix clipped as above."""
    if not sample.has_matrix:
        return sample.spectrum
    return normalized_spectrum(sample.matrix, clip_quantile=_clip_of(sample, clip), device=device)


def _step_rows(key, samples, spectra, schedules: Mapping[str, Schedule]) -> list[dict]:
    """Mean spectral error per training step, for the samples that carry one (recordings, harvests)."""
    steps = [sample.meta.get("step") for sample in samples]
    if all(step is None for step in steps):
        return []
    errors = {label: sample_errors(spectra, s) for label, s in schedules.items()}
    rows = []
    for step in sorted({s for s in steps if s is not None}):
        chosen = torch.tensor([s == step for s in steps])
        reference = float(errors["polar-express"][chosen].mean())
        for label, values in errors.items():
            mean = float(values[chosen].mean())
            rows.append(
                {
                    "shape": format_shape(key),
                    "step": int(step),
                    "table": label,
                    "samples": int(chosen.sum()),
                    "spectral_mean": mean,
                    "ratio_vs_polar-express": mean / reference if reference > 0 else math.nan,
                }
            )
    return rows


COLUMNS = [
    "shape",
    "table",
    "samples",
    "spectral_mean",
    "spectral_p95",
    "float32_mean",
    "ratio_vs_polar-express",
    "tail_below_1e-3",
    "lowest_sigma",
]


def _rows(key, spectra, schedules: Mapping[str, Schedule], checked, tails) -> list[dict]:
    errors = {label: sample_errors(spectra, s) for label, s in schedules.items()}
    reference = float(errors["polar-express"].mean())
    return [
        {
            "shape": format_shape(key),
            "table": label,
            "samples": int(values.numel()),
            "spectral_mean": float(values.mean()),
            "spectral_p95": float(values.quantile(0.95)),
            "float32_mean": _mean(checked.get(label, {}).get("float32")),
            "ratio_vs_polar-express": float(values.mean()) / reference if reference > 0 else math.nan,
            "tail_below_1e-3": tails["fraction_below_1e-3"],
            "lowest_sigma": tails["lowest_sigma"],
        }
        for label, values in errors.items()
    ]


def deep_tail_warning(key, tails: Mapping[str, float], table: CoefficientTable, label: str) -> str:
    """One line where the user's spectra go deeper than the entry's calibration and guaranteed stress sets.

    Deeper means a larger share of σ below 1e-3·σ_max, or a lower σ_min/σ_max, than every recorded set.
    Entries that fell back to the baseline's rows (issue 10) cannot lose to it, and say nothing.
    """
    if not table.entries:
        return ""  # a bundled baseline's default rows: nothing was calibrated
    metrics = _entry_metrics(table, key)
    if "fallback" in metrics:
        return ""
    recorded = metrics.get("tails")
    shape = format_shape(key)
    if not recorded:
        return (
            f"{shape}: {label} records no calibration tail statistics (fitted before the robust "
            "fit), so nothing says whether this momentum is deeper-tailed than its samples"
        )
    guaranteed = set((metrics.get("robust") or {}).get("guaranteed") or [])
    sets = [recorded["calibration"]] + [v for k, v in recorded.get("stress", {}).items() if k in guaranteed]
    deepest_fraction = max(s["fraction_below_1e-3"] for s in sets)
    lowest = min(s["lowest_sigma"] for s in sets)
    if tails["fraction_below_1e-3"] <= deepest_fraction and tails["lowest_sigma"] >= lowest:
        return ""
    return (
        f"{shape}: this momentum is deeper-tailed than anything {label} was calibrated or "
        f"stress-tested on ({tails['fraction_below_1e-3']:.1%} of σ below 1e-3·σ_max, lowest σ/σ_max "
        f"{tails['lowest_sigma']:.2g}; the table's: {deepest_fraction:.1%}, {lowest:.2g}); its rows may lose "
        "to Polar Express here"
    )


def matrix_shapes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Canonical matrix shapes of the 2-D (and conv) tensors in the files, in first-seen order.

    Safetensors headers give the shapes without reading a tensor; torch files are loaded (as --real loads
    them). Which tensors count as momentum is decided by ``load_real_samples`` afterwards.
    """
    real.validate_real_paths(paths)
    shapes: dict[tuple[int, int], None] = {}
    for path in real.momentum_files(paths):
        for dims in _recorded_dims(path) if is_recording(path) else _tensor_dims(path):
            key = real.matrix_key(dims)
            if key is not None:
                shapes.setdefault(key, None)
    return list(shapes)


def _recorded_dims(path: Path) -> list[Sequence[int]]:
    """The matrix shapes a ROOT recording holds (spectra and whole updates alike)."""
    return [spectrum.shape for spectrum in read_spectra([path])]


def _tensor_dims(path: Path) -> list[Sequence[int]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return [handle.get_slice(k).get_shape() for k in handle.keys()]  # noqa: SIM118
        except Exception as error:  # the user's file, reported in one line
            raise CalibrationError(f"cannot read real momentum file {path}: {error}") from None
    everything = _Everything()
    return [tensor.shape for _, tensor, _ in real.read_tensors(path, everything, True, FLAG)]


class _Everything:
    """A ``wanted`` set holding every shape, to list a torch file's tensors."""

    def __contains__(self, item: object) -> bool:
        return True


def _baselines(key) -> dict[str, Schedule]:
    return {name: load_table(name).schedule_for(key) for name in REAL_BASELINES}


def _float32_check(key, matrices, schedules, device) -> dict[str, dict[str, list[float]]]:
    """The float32 iteration on the first few (already clipped) matrices, where the shape is affordable."""
    if key[0] * key[1] > MATRIX_CHECK_MAX_ELEMENTS or not matrices:
        return {}
    return matrix_errors(
        matrices[:MATRIX_CHECK_SAMPLES],
        schedules,
        clip_quantile=None,
        device=device,
        dtypes={label: ("float32",) for label in schedules},
    )


def _entry_metrics(table: CoefficientTable, key) -> Mapping:
    for entry in table.entries:
        if tuple(entry.shape) == tuple(key):
            return entry.metrics or {}
    return {}


def _load(spec: str) -> CoefficientTable:
    try:
        return load_table(spec)
    except TableError as error:
        raise CalibrationError(f"unknown table '{spec}': {error}") from None


def _mean(values: Sequence[float] | None) -> float:
    return float(torch.tensor(values, dtype=torch.float64).mean()) if values else math.nan


def real_report_text(
    tables: Sequence[str], paths: Sequence[Path], fmt: str, is_momentum: bool, device: str
) -> tuple[str, list[str]]:
    """The report of every table in ``fmt`` (report's formats), and the warnings, one line each."""
    from .report import REPORT_TITLE, format_report

    reports = [real_report(spec, paths, is_momentum=is_momentum, device=device) for spec in tables]
    frame = pd.concat([r.frame for r in reports], ignore_index=True)
    steps = pd.concat(
        [r.steps for r in reports if not r.steps.empty] or [reports[0].steps], ignore_index=True
    )
    warnings = [w for r in reports for w in r.warnings]
    if steps.empty:
        return format_report(frame, fmt).replace(REPORT_TITLE, REAL_TITLE, 1), warnings
    if fmt in ("csv", "json"):  # one document: the per-step rows after the overall ones (step "all")
        combined = pd.concat([frame.assign(step="all"), steps], ignore_index=True)
        return format_report(combined[["shape", "step", *COLUMNS[1:]]], fmt), warnings
    overall = format_report(frame, fmt).replace(REPORT_TITLE, REAL_TITLE, 1)
    by_step = format_report(steps, fmt).replace(REPORT_TITLE, STEPS_TITLE, 1)
    if fmt == "markdown":
        overall, by_step = f"{REAL_TITLE}\n\n{overall}", f"{STEPS_TITLE}\n\n{by_step}"
    return f"{overall}\n\n{by_step}", warnings
