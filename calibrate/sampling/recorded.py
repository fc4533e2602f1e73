"""Samples from ROOT's own momentum recordings (``ROOT(record_dir=...)``, root_core/recording.py).

A recording holds, per recorded step and matrix, the float64 singular values of the clipped update that
Newton–Schulz received, and for chosen parameters the whole update. Newton–Schulz acts on singular values
only (docs/design.md §1.1), so a recorded spectrum is a complete calibration sample for the fit, the
validation errors and the baseline check: a :class:`SpectrumSample` carries it, normalised as
``calibrate/spectra.py`` normalises (σ_i / ‖B‖_F), and no matrix. Only the float32/bf16 matrix check needs
a matrix: it runs on the recorded whole updates (re-clipped, which gives B again) and skips spectra.

A recorded spectrum was taken at the run's clip quantile and cannot be re-clipped, so a calibration at
another quantile is refused rather than fitted to the wrong distribution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from root_core.recording import (
    RecordedMatrix,
    RecordedSpectrum,
    RecordingError,
    is_recording,
    read_recorded_matrices,
    read_recordings,
)
from root_core.tables import canonical_shape

from ..errors import CalibrationError
from .base import Sample

Shape = tuple[int, int]
_RECORDED_SOURCE = re.compile(r":(?:sigma|update):.*@step(\d+)$")


@dataclass(frozen=True, kw_only=True)
class SpectrumSample:
    """A real sample known by its normalised spectrum only (float64, descending, Σσ² = 1).

    Duck-types :class:`Sample` for the stages that need no matrix; ``matrix`` is None and
    ``has_matrix`` False, so the matrix checks pass over it.
    """

    spectrum: Tensor
    shape: Shape  # canonical (min, max)
    kind: Literal["real"] = "real"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    matrix: None = None
    has_matrix: bool = False

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.spectrum).all())


def normalized(singular_values: Tensor) -> Tensor:
    """σ_i / ‖B‖_F, as ``calibrate.spectra.normalized_spectrum`` divides (by the root of Σσ²)."""
    squares = singular_values.to(torch.float64).square()
    total = squares.sum()
    return (squares / total).sqrt() if total > 0 else squares


def recording_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The recording files among ``paths`` (files, or folders searched recursively), sorted per path."""
    from .real import momentum_files

    return [file for file in momentum_files(paths) if is_recording(file)]


def recorded_shapes(paths: Sequence[str | Path]) -> list[Shape]:
    """Canonical shapes of every recorded matrix under ``paths``, in first-recorded order."""
    shapes: dict[Shape, None] = {}
    for spectrum in read_spectra(recording_paths(paths)):
        shapes.setdefault(canonical_shape(spectrum.shape), None)
    return list(shapes)


def read_spectra(files: Sequence[Path]) -> list[RecordedSpectrum]:
    try:
        return [spectrum for file in files for spectrum in read_recordings(file)]
    except RecordingError as error:
        raise CalibrationError(str(error)) from None


def read_matrices(files: Sequence[Path]) -> list[RecordedMatrix]:
    try:
        return [matrix for file in files for matrix in read_recorded_matrices(file)]
    except RecordingError as error:
        raise CalibrationError(str(error)) from None


def recorded_source(file: str | None, key: str, step: int) -> str:
    """``file:<recording>:<tensor key>@step<N>``: the file, the parameter and the step, for provenance."""
    return f"file:{file}:{key}@step{step}"


def recorded_step(source: str) -> int | None:
    """The training step in a source :func:`recorded_source` made, else None."""
    match = _RECORDED_SOURCE.search(source)
    return int(match[1]) if match and source.startswith("file:") else None


def _meta(record: RecordedSpectrum | RecordedMatrix, key: str) -> dict[str, Any]:
    return {
        "file": record.file,
        "key": key,
        "step": record.step,
        "param_name": record.name,
        "rank": record.rank,
        "recorded_table": record.table,
        "clip_quantile": record.clip_quantile,
        "stored_shape": list(record.shape),
    }


def samples_from_recording(
    file: Path, wanted: set[Shape], *, matrices: bool = True
) -> list[tuple[Shape, Sample | SpectrumSample]]:
    """(shape, sample) for each recorded matrix of a wanted shape in one recording file.

    ``matrices``: a recorded whole update becomes a matrix :class:`Sample` (its spectrum is then
    computed from it at the calibration's clip) instead of the spectrum-only sample of the same step.
    """
    whole = {(m.step, m.name): m for m in read_matrices([file])} if matrices else {}
    found: list[tuple[Shape, Sample | SpectrumSample]] = []
    for record in read_spectra([file]):
        key = canonical_shape(record.shape)
        if key not in wanted:
            continue
        update = whole.get((record.step, record.name))
        if update is not None:
            tensor_key = f"update:{record.name}"
            sample: Sample | SpectrumSample = Sample(
                matrix=update.update.to(torch.float32),
                kind="real",
                source=recorded_source(record.file, tensor_key, record.step),
                meta=_meta(update, tensor_key),
            )
        else:
            tensor_key = f"sigma:{record.name}"
            sample = SpectrumSample(
                spectrum=normalized(record.singular_values),
                shape=key,
                source=recorded_source(record.file, tensor_key, record.step),
                meta=_meta(record, tensor_key),
            )
        found.append((key, sample))
    return found


def rotate_within_steps(samples: list[Any]) -> list[Any]:
    """A shape's recorded samples in step order, the j-th recorded step's matrices rotated by j.

    Calibration spreads its picks evenly over this list (``pipeline._spread``), which balances the phases
    of the run; the rotation also varies the parameters picked (without it, picking every other sample of
    a run that records two same-shape matrices per step would take the same parameter at every step).
    Lists that hold anything but recordings are left as they are.
    """
    if not samples or not all("recorded_table" in sample.meta for sample in samples):
        return samples
    by_step: dict[int, list[Any]] = {}
    for sample in samples:
        by_step.setdefault(sample.meta["step"], []).append(sample)
    ordered = []
    for j, step in enumerate(sorted(by_step)):
        group = by_step[step]
        shift = j % len(group)
        ordered += group[shift:] + group[:shift]
    return ordered


def check_recorded_clip(samples: Sequence[Any], clip_quantile: float | None) -> None:
    """Refuse recorded spectra taken at another clip quantile than the calibration's: one line."""
    for sample in samples:
        if isinstance(sample, SpectrumSample) and not _same_clip(sample.meta["clip_quantile"], clip_quantile):
            recorded = sample.meta["clip_quantile"]
            flag = "none" if recorded is None else f"{recorded:g}"
            raise CalibrationError(
                f"recording {sample.meta['file']} was clipped at quantile {recorded} (the run's "
                f"outlier_quantile) but the calibration clips at {clip_quantile}; a recorded spectrum cannot "
                f"be re-clipped: pass --clip-quantile {flag}"
            )


def _same_clip(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-12)


def check_recorded_shapes(
    paths: Sequence[str | Path], asked: Sequence[Shape], found: dict[Shape, list[Any]]
) -> None:
    """With recordings among ``--real``, every asked shape must have real samples: one line otherwise."""
    files = recording_paths(paths)
    if not files:
        return
    missing = [key for key in asked if not found.get(key)]
    if not missing:
        return
    held = ", ".join(_format(key) for key in recorded_shapes(files)) or "none"
    raise CalibrationError(
        f"--real {', '.join(map(str, paths))} holds no recording of shape "
        f"{', '.join(_format(key) for key in missing)} (its recordings are of {held}); calibrate the "
        "recorded shapes (leave out --shapes/--arch/--config) or record the model that has these shapes"
    )


def _format(key: Shape) -> str:
    return f"{key[0]}x{key[1]}"
