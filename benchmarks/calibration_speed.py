"""Where calibration spends its time: wall time per stage, and why it fits spectra.

Per shape (``--shapes``, default a small and a large one), the default run's stages are timed by
calling the pipeline's own stage functions in order, with no cache (a cold run): harvest (real
momentum), synthetic sampling, spectra (clip + Gram + eigvalsh, float64, every sample), fit (the
default search on the calibration spectra) and check (the matrix iteration on validation matrices
against the SVD polar factor, calibrated rows and baselines). Then, at ``--shape``, one objective
evaluation from spectra against one from the matrix iteration (the spectral vs matrix objective):
scoring a candidate schedule on S calibration samples either runs Newton–Schulz on every matrix and
compares with the polar factor, or evaluates the composed polynomial on their normalised singular
values (docs/design.md §1). Medians of --repeats; the matrix objective is timed on one sample times S.

    python benchmarks/calibration_speed.py --shapes 256x1024,4096x11008 --shape 4096x11008 --record
    python benchmarks/calibration_speed.py --shapes 16x48 --shape 16x48 --samples 4 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results import publish

from calibrate.errors import CalibrationError
from calibrate.fitting.fit import FitSettings, compress
from calibrate.fitting.objective import mean_error
from calibrate.fitting.pipeline import (
    CalibrationRequest,
    check_matrices,
    fit_shape,
    harvest_stage,
    plan_samples,
    sample_spectrum,
)
from calibrate.progress import Stages
from calibrate.sampling.mix import parse_ratio, train_validation_split
from calibrate.sampling.synthetic import synthetic_samples
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import SpectrumCache, normalized_spectrum
from root_core import load_table, orthogonalize

STAGES = ("harvest", "synthetic", "spectra", "fit", "check")
# A first call that takes this long is no warm-up artefact (allocator, lazy init are milliseconds),
# so it counts as a sample: at 4096×11008 on a CPU one float32 NS takes ~30–60 s.
SLOW_CALL_S = 1.0


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after a warm-up call unless the first call is already slow."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = [first] if first >= SLOW_CALL_S else []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- per-stage wall time ---------------------------------------------------------------------------


class StageTimer:
    """Seconds per stage name, and each sample's spectrum time (for the objective ratio below)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.spectrum_seconds: list[float] = []

    def run(self, name: str, fn: Callable[[], object]):
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - start
        return result


def time_stages(key, args) -> tuple[StageTimer, dict[str, int]]:
    """One cold calibration of ``key`` at the default settings, stage by stage, through the pipeline."""
    request = CalibrationRequest(
        shapes=[key],
        out=Path("unused"),  # nothing is written: the table-writing step is not timed
        name="calibration-speed",
        ratio=args.ratio,
        samples=args.samples,
        harvest_steps=args.harvest_steps,
        fit=FitSettings(iterations=args.fit_iterations),
        cache_dir=None,
    )
    stages, timer = Stages(None), StageTimer()
    plan = plan_samples(key, request, [])
    real = timer.run("harvest", lambda: harvest_stage(plan, request, stages) if plan.harvest else [])
    synthetic = timer.run("synthetic", lambda: synthetic_samples(key, plan.synthetic, seed=request.seed))
    samples = real + synthetic
    calibration, validation = train_validation_split(samples, request.validation_fraction, seed=request.seed)
    cache = SpectrumCache(None)

    def spectra() -> dict[int, torch.Tensor]:
        out = {}
        for sample in samples:
            start = time.perf_counter()
            out[id(sample)] = sample_spectrum(sample, request, cache)
            timer.spectrum_seconds.append(time.perf_counter() - start)
        return out

    by_sample = timer.run("spectra", spectra)
    fitted = timer.run(
        "fit", lambda: fit_shape(key, [by_sample[id(s)] for s in calibration], request, stages)
    )
    checked = [s.matrix for s in validation[: request.check_samples]]
    timer.run("check", lambda: check_matrices(key, checked, fitted, request, lambda _: None))
    counts = {
        "real": len(real),
        "synthetic": len(synthetic),
        "calibration": len(calibration),
        "checked": len(checked),
    }
    return timer, counts


def stage_lines(results) -> list[str]:
    lines = [
        "| shape | samples (real + synthetic; fit on; checked) | "
        + " | ".join(STAGES)
        + " | total | fit share |",
        "|---|---|" + "---|" * (len(STAGES) + 2),
    ]
    for key, (timer, counts) in results.items():
        total = sum(timer.seconds.values())
        cells = " | ".join(f"{timer.seconds[stage]:.2f}" for stage in STAGES)
        lines.append(
            f"| {format_shape(key)} | {counts['real']} + {counts['synthetic']}; {counts['calibration']}; "
            f"{counts['checked']} | {cells} | {total:.1f} | {timer.seconds['fit'] / total:.1%} |"
        )
    return lines


# ---- spectral vs matrix objective ------------------------------------------------------------------


def ratio_lines(key, args, stage_run: tuple[StageTimer, dict[str, int]] | None) -> list[str]:
    """One objective evaluation from spectra vs from the matrix iteration, at ``key``, side by side.

    Where ``key``'s stages were timed, its own calibration split and spectrum times are reused.
    """
    timer, counts = stage_run or (None, {})
    # Else the default run's split: a quarter of the samples held out for validation.
    samples = counts.get("calibration", args.samples - round(args.samples * 0.25))
    schedule = load_table("polar-express").default_schedule
    matrix = torch.randn(key, generator=torch.Generator().manual_seed(0))
    if timer is not None and timer.spectrum_seconds:
        spectrum_seconds = statistics.median(timer.spectrum_seconds)  # the stage run's own samples
        spectrum_note = f"median of the {len(timer.spectrum_seconds)} samples above"
    else:
        spectrum_seconds = median_seconds(
            lambda: normalized_spectrum(matrix, clip_quantile=0.9), args.repeats
        )
        spectrum_note = f"Gaussian matrix, median of {args.repeats}"
    sigma = normalized_spectrum(matrix, clip_quantile=0.9)
    spectra = sigma.expand(samples, -1).contiguous()
    full = median_seconds(lambda: mean_error(spectra, schedule), max(args.repeats, 20))
    search = median_seconds(lambda: mean_error(compress(spectra), schedule), max(args.repeats, 20))
    ns = median_seconds(lambda: orthogonalize(matrix, schedule, dtype=torch.float32), args.repeats)
    matrix_objective = ns * samples
    return [
        f"Spectral vs matrix objective at {format_shape(key)}: {samples} calibration samples, 5 steps "
        "(Polar Express rows).",
        "",
        "| quantity | seconds |",
        "|---|---|",
        f"| one spectrum (clip, Gram, eigvalsh; float64), once per sample ({spectrum_note}) | "
        f"{spectrum_seconds:.2f} |",
        f"| spectral objective, full spectra ({samples}×{min(key)}) | {full:.6f} |",
        f"| spectral objective, search form ({samples}×512 order statistics) | {search:.6f} |",
        f"| matrix objective: float32 NS × {samples} samples (one NS: {ns:.2f} s) | {matrix_objective:.2f} |",
        f"| **ratio matrix / spectral (full)** | **{matrix_objective / full:,.0f}×** |",
        f"| ratio matrix / spectral (search form) | {matrix_objective / search:,.0f}× |",
    ]


# ---- command line ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="256x1024,4096x11008", help="shapes whose stages are timed")
    parser.add_argument("--shape", default="4096x11008", help="shape of the spectral vs matrix objective")
    parser.add_argument("--samples", type=int, default=16, help="samples per shape (the default run's 16)")
    parser.add_argument("--ratio", default="1:3", help="real:synthetic (the default run's 1:3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--harvest-steps", type=int, default=None, help="default: the default run's")
    parser.add_argument(
        "--fit-iterations", type=int, default=FitSettings().iterations, help="search generations"
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.harvest_steps is not None and args.harvest_steps < 1:
        parser.error(f"--harvest-steps must be at least 1, got {args.harvest_steps}")
    if args.fit_iterations < 1:
        parser.error(f"--fit-iterations must be at least 1, got {args.fit_iterations}")
    if args.samples < 2:
        parser.error(f"--samples must be at least 2 (calibration + validation), got {args.samples}")
    try:
        args.stage_shapes = parse_shapes(args.shapes)
        (args.ratio_shape,) = parse_shapes(args.shape)
        args.ratio = parse_ratio(args.ratio)
    except (CalibrationError, ValueError) as error:
        parser.error(str(error))
    return args


def main() -> None:
    args = parse_args()
    results = {}
    for key in args.stage_shapes:
        started = time.perf_counter()
        results[key] = time_stages(key, args)
        print(
            f"{format_shape(key)}: stages in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    machine = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    real, synthetic = args.ratio
    lines = [
        f"### calibration_speed — {dt.date.today()} — {machine} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/calibration_speed.py {shlex.join(sys.argv[1:])}`. Per shape: one "
        f"cold calibration at {args.samples} samples, {real}:{synthetic}, q=0.9 clip, per-step rows, "
        f"5 steps, scipy search ({args.fit_iterations} generations); wall seconds per stage, through the "
        "pipeline's stage functions, no cache "
        "(writing the table is not timed).",
        "",
        *stage_lines(results),
        "",
        *ratio_lines(args.ratio_shape, args, results.get(args.ratio_shape)),
        "",
    ]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
