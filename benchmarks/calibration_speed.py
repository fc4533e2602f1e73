"""Why calibration fits spectra: one objective evaluation from spectra vs from the matrix iteration.

Scoring a candidate schedule on S calibration samples either runs Newton–Schulz on every matrix and
compares with the polar factor (the matrix objective), or evaluates the composed polynomial on their
normalised singular values (the spectral objective, DESIGN.md §1). Both are timed here side by side
at one shape, medians of --repeats; the matrix objective is timed on one sample and multiplied by S.

    python benchmarks/calibration_speed.py --shape 4096x11008 --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch
from results import publish

from calibrate.fit import compress
from calibrate.objective import mean_error
from calibrate.shapes import parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table, orthogonalize

CALIBRATION_SAMPLES = 12  # the default run: 16 samples, a quarter held out for validation


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="4096x11008")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    (key,) = parse_shapes(args.shape)
    schedule = load_table("polar-express").default_schedule
    matrix = torch.randn(key, generator=torch.Generator().manual_seed(0))
    spectrum_seconds = median_seconds(lambda: normalized_spectrum(matrix, clip_quantile=0.9), args.repeats)
    sigma = normalized_spectrum(matrix, clip_quantile=0.9)
    spectra = sigma.expand(CALIBRATION_SAMPLES, -1).contiguous()
    full = median_seconds(lambda: mean_error(spectra, schedule), max(args.repeats, 20))
    search = median_seconds(lambda: mean_error(compress(spectra), schedule), max(args.repeats, 20))
    ns = median_seconds(lambda: orthogonalize(matrix, schedule, dtype=torch.float32), args.repeats)
    matrix_objective = ns * CALIBRATION_SAMPLES
    machine = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    command = f"python benchmarks/calibration_speed.py --shape {args.shape} --repeats {args.repeats}"
    samples = CALIBRATION_SAMPLES
    report = "\n".join(
        [
            f"### calibration_speed — {dt.date.today()} — {machine} — torch {torch.__version__}",
            "",
            f"Command: `{command}`; {samples} calibration samples, 5 steps (Polar Express rows), medians.",
            "",
            "| quantity | seconds |",
            "|---|---|",
            f"| one spectrum (clip, Gram, eigvalsh; float64), once per sample | {spectrum_seconds:.2f} |",
            f"| spectral objective, full spectra ({samples}×{min(key)}) | {full:.6f} |",
            f"| spectral objective, search form ({samples}×512 order statistics) | {search:.6f} |",
            f"| matrix objective: float32 NS × {CALIBRATION_SAMPLES} samples (one NS: {ns:.2f} s) | "
            f"{matrix_objective:.2f} |",
            f"| **ratio matrix / spectral (full)** | **{matrix_objective / full:,.0f}×** |",
            f"| ratio matrix / spectral (search form) | {matrix_objective / search:,.0f}× |",
            "",
        ]
    )
    publish(report, args.record)


if __name__ == "__main__":
    main()
