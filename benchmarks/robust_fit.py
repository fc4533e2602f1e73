"""Robust fit (issue 10): mean fit against the stress constraint and a soft stress penalty, side by side.

For each shape: draw the default synthetic mix (the same seeded samples calibration draws), split it as
calibration does, fit three ways (``--fit mean``; ``--fit robust`` with the stress sets as a constraint,
the default; the stress excess added to the mean error instead), and print, for each fit, the mean error
on the calibration and validation spectra and on each stress set of both, next to the baseline's
(Polar Express for per-step rows, Muon for one shared triple).

    python benchmarks/robust_fit.py --shapes 256x256,768x2304 --samples 12

Spectral float64 errors only (no matrix iteration): the fit is judged where it is made.
"""

from __future__ import annotations

import argparse
import time

from calibrate.fitting.fit import FitSettings, fit
from calibrate.fitting.objective import mean_error, stack_spectra, stress_sets
from calibrate.sampling.mix import train_validation_split
from calibrate.sampling.synthetic import synthetic_samples
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core.tables import load_table

VARIANTS = {
    "mean": dict(criterion="mean"),
    "robust (constraint)": dict(criterion="robust", stress_mode="constraint"),
    "robust (penalty)": dict(criterion="robust", stress_mode="penalty"),
}


def measure(key, args) -> list[str]:
    samples = synthetic_samples(key, args.samples, seed=args.seed)
    calibration, validation = train_validation_split(samples, 0.25, seed=args.seed)
    spectra = {
        part: stack_spectra([normalized_spectrum(s.matrix, clip_quantile=0.9) for s in chosen])
        for part, chosen in (("cal", calibration), ("val", validation))
    }
    lines = []
    for name, options in VARIANTS.items():
        settings = FitSettings(form=args.schedule, steps=args.steps, iterations=args.iterations, **options)
        baseline_name = settings.stress_baseline
        baseline = load_table(baseline_name).default_schedule.with_steps(args.steps)
        started = time.perf_counter()
        result = fit(spectra["cal"], settings, label=format_shape(key))
        seconds = time.perf_counter() - started
        cells = [format_shape(key), name, f"{seconds:.1f}"]
        for part in ("cal", "val"):
            cells.append(
                _pair(mean_error(spectra[part], result.schedule), mean_error(spectra[part], baseline))
            )
        for part in ("cal", "val"):
            for s in stress_sets(spectra[part], baseline):
                cells.append(_pair(mean_error(s.spectra, result.schedule), s.baseline_error))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pair(error: float, baseline: float) -> str:
    mark = "" if error <= baseline + 1e-12 else " ✗"
    return f"{error:.4f} / {baseline:.4f}{mark}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="256x256,768x2304")
    parser.add_argument("--samples", type=int, default=12, help="synthetic samples per shape")
    parser.add_argument("--iterations", type=int, default=200, help="search generations")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--schedule", default="per-step", choices=("per-step", "shared"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stress = ["tail-x0.1", "tail-x0.01", "low-rank"]
    header = [
        "shape",
        "fit",
        "fit s",
        "cal",
        "val",
        *(f"cal {s}" for s in stress),
        *(f"val {s}" for s in stress),
    ]
    print("Each cell: the fit's spectral float64 error / the baseline's (✗: worse than the baseline).")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for key in parse_shapes(args.shapes):
        for line in measure(key, args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
