"""Which stress sets cost the robust fit its headroom? Robust-fit variants scored on independent momentum.

For each shape: the calibration samples ``root-calibrate`` draws by default (harvest from ``--cache``,
synthetic mix, seed 0, the same calibration/validation split), fitted with the default robust criterion
under variants of its stress sets, then scored on the independent held-out momentum of
``precision.py`` (another family, corpus and optimizers, early to late): mean float64 error, the worst
phase/optimizer group's error relative to Polar Express, and the share of the headroom captured,
(PE − fit) / (PE − oracle), with the oracle a mean fit on the independent matrices themselves.

Variants (the stress sets are module constants of calibrate/fitting/objective.py; a variant swaps them
for one fit):
``mean`` no stress sets; ``all`` the default (tail ×0.1, tail ×0.01, low-rank); ``tails`` without the
low-rank set; ``x0.1`` the ×0.1 tail only; ``low-rank`` the low-rank set only; ``lr0.1`` the low-rank set
at ×0.1 instead of ×0.01.

    python benchmarks/stress_variants.py --shapes 128x896,896x4864,896x896 --cache /tmp/qwen/cache
    python benchmarks/stress_variants.py --independent-set 2 ...   # the blind second set
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from precision import INDEPENDENT_COUNT, held_out_corpus, independent_groups, independent_samples

from calibrate.cli import default_cache_dir
from calibrate.fitting import objective
from calibrate.fitting.fit import FitSettings, fit
from calibrate.fitting.pipeline import CalibrationRequest, collect_samples
from calibrate.progress import Stages
from calibrate.sampling.mix import train_validation_split
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table

CLIP_QUANTILE = 0.9
KEEP = {
    "mean": None,
    "all": ("tail-x0.1", "tail-x0.01", "low-rank"),
    "tails": ("tail-x0.1", "tail-x0.01"),
    "x0.1": ("tail-x0.1",),
    "low-rank": ("low-rank",),
    "lr0.1": ("tail-x0.1", "tail-x0.01", "low-rank"),
}


@contextlib.contextmanager
def stress_variant(name: str):
    """objective.stress_spectra restricted to the variant's sets (and its low-rank depth), for one fit."""
    original, factor = objective.stress_spectra, objective.LOW_RANK_FACTOR
    objective.LOW_RANK_FACTOR = 0.1 if name == "lr0.1" else factor
    objective.stress_spectra = lambda spectra: {
        k: v for k, v in original(spectra).items() if k in (KEEP[name] or ())
    }
    try:
        yield
    finally:
        objective.stress_spectra, objective.LOW_RANK_FACTOR = original, factor


def spectra_of(samples) -> torch.Tensor:
    return objective.stack_spectra(
        [normalized_spectrum(s.matrix, clip_quantile=CLIP_QUANTILE) for s in samples]
    )


def rows_for(key, args) -> list[str]:
    request = CalibrationRequest(shapes=[key], out=Path("unused"), name="unused", cache_dir=args.cache)
    calibration, _ = train_validation_split(collect_samples(key, request, Stages(None), []), 0.25, seed=0)
    calibration_spectra = spectra_of(calibration)
    held = SimpleNamespace(
        independent_count=INDEPENDENT_COUNT, corpus=held_out_corpus(), steps=None, cache=args.held_out_cache
    )
    independent = independent_samples(key, held, args.independent_set)
    spectra, groups = spectra_of(independent), independent_groups(independent)
    polar = objective.sample_errors(spectra, load_table("polar-express").schedule_for(key))
    oracle = fit(spectra, FitSettings(iterations=args.iterations, criterion="mean")).schedule
    oracle_error = float(objective.sample_errors(spectra, oracle).mean())
    lines = []
    for name in args.variants.split(","):
        started = time.perf_counter()
        criterion = "mean" if name == "mean" else "robust"
        with stress_variant(name):
            result = fit(calibration_spectra, FitSettings(iterations=args.iterations, criterion=criterion))
        errors = objective.sample_errors(spectra, result.schedule)
        worst = max(float(errors[g].mean() / polar[g].mean()) for g in groups.values())
        share = (float(polar.mean()) - float(errors.mean())) / (float(polar.mean()) - oracle_error)
        lines.append(
            f"| {format_shape(key)} | {name} | {float(errors.mean()):.4f} | {float(polar.mean()):.4f} | "
            f"{oracle_error:.4f} | {worst:.3f} | {share:.2f} | {time.perf_counter() - started:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="128x896,896x4864")
    parser.add_argument("--variants", default=",".join(KEEP))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="root-calibrate's cache")
    parser.add_argument(
        "--held-out-cache", type=Path, default=default_cache_dir(), help="precision.py's cache"
    )
    parser.add_argument(
        "--independent-set",
        type=int,
        choices=(1, 2),
        default=1,
        help="precision.py's independent held-out set to score on (2: the blind one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| shape | variant | independent | Polar Express | oracle | worst group ÷ PE | headroom | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for key in parse_shapes(args.shapes):
        rows_for(key, args)


if __name__ == "__main__":
    main()
