"""The two candidates of a robust calibration, scored on independent momentum: is validation a good judge?

For each shape: the calibration samples ``root-calibrate`` draws by default (harvest from ``--cache``,
synthetic mix, seed 0, the same calibration/validation split), fitted twice as a robust run does
(calibrate/fitting/pipeline.py ``pick_by_validation``): the robust rows, and the guarded rows that are
also no worse than the baseline on every calibration sample. Each candidate's validation error (the
CLI ships the lower) next to its error on both independent held-out sets of ``precision.py``, relative
to the baseline (Polar Express; ``--schedule shared``: Muon's triple), overall and on the worst
phase/optimizer group. Bold: the candidate the CLI ships.

    python benchmarks/candidates.py --shapes 128x896,896x896,896x4864 --cache /tmp/qwen/cache \\
        --held-out-cache /tmp/me/cache
    python benchmarks/candidates.py --shapes 2048x16384 --schedule shared --cache /tmp/llama/cache ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from precision import INDEPENDENT_COUNT, held_out_corpus, independent_groups, independent_samples
from results import publish

from calibrate.cli import default_cache_dir
from calibrate.fitting.fit import STRESS_BASELINES, FitSettings
from calibrate.fitting.objective import mean_error, sample_errors, stack_spectra
from calibrate.fitting.pipeline import CalibrationRequest, collect_samples, fit_candidates, pick_by_validation
from calibrate.progress import Stages
from calibrate.sampling.mix import train_validation_split
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table

CLIP_QUANTILE = 0.9  # ROOT's and calibration's default soft-threshold quantile
SETS = (1, 2)


def spectra_of(samples) -> torch.Tensor:
    return stack_spectra([normalized_spectrum(s.matrix, clip_quantile=CLIP_QUANTILE) for s in samples])


def candidates_for(key, settings: FitSettings, cache: Path | None) -> tuple[dict, dict, str, float]:
    """Both candidates' rows with their fit seconds, their validation errors, the one the CLI ships and
    the baseline's validation error: the CLI's own ``fit_candidates`` and ``pick_by_validation``."""
    request = CalibrationRequest(
        shapes=[key], out=Path("unused"), name="unused", cache_dir=cache, fit=settings
    )
    calibration, validation = train_validation_split(
        collect_samples(key, request, Stages(None), []), request.validation_fraction, seed=request.seed
    )
    fitted_on = [normalized_spectrum(s.matrix, clip_quantile=CLIP_QUANTILE) for s in calibration]
    robust, guarded = fit_candidates(key, fitted_on, request)
    fitted = {"robust": (robust.schedule, robust.seconds), "guarded": (guarded.schedule, guarded.seconds)}
    checked_on = spectra_of(validation)
    picked = pick_by_validation(robust, guarded, checked_on).candidates
    validation_errors = {name: picked[name]["validation_error"] for name in fitted}
    baseline = load_table(settings.stress_baseline).schedule_for(key)
    return fitted, validation_errors, picked["chosen"], mean_error(checked_on, baseline)


def held_out_ratios(key, schedules: dict, baseline_name: str, cache: Path | None, which: int) -> dict:
    """Each schedule's mean error ÷ the baseline's on independent set ``which``: overall, worst group."""
    held = SimpleNamespace(
        independent_count=INDEPENDENT_COUNT, corpus=held_out_corpus(), steps=None, cache=cache
    )
    samples = independent_samples(key, held, which)
    spectra = spectra_of(samples)
    baseline = sample_errors(spectra, load_table(baseline_name).schedule_for(key))
    ratios = {}
    for name, schedule in schedules.items():
        errors = sample_errors(spectra, schedule)
        by_group = {
            g: float(errors[i].mean() / baseline[i].mean()) for g, i in independent_groups(samples).items()
        }
        ratios[name] = (by_group["independent"], max(by_group.values()))
    return ratios


def shape_row(key, args) -> str:
    settings = FitSettings(form=args.schedule, iterations=args.iterations)
    fitted, validation, pick, baseline_validation = candidates_for(key, settings, args.cache)
    schedules = {name: schedule for name, (schedule, _) in fitted.items()}
    cells = []
    for which in SETS:
        ratios = held_out_ratios(key, schedules, settings.stress_baseline, args.held_out_cache, which)
        for part in (0, 1):
            cells.append(
                " / ".join(_bold(f"{ratios[n][part]:.3f}", n == pick) for n in ("robust", "guarded"))
            )
    return (
        f"| {format_shape(key)} | {validation['robust']:.4f} / {validation['guarded']:.4f} "
        f"({baseline_validation:.4f}) | {pick} | {' | '.join(cells)} | "
        f"{fitted['robust'][1]:.0f} / {fitted['guarded'][1]:.0f} |"
    )


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="128x896,896x896,896x4864")
    parser.add_argument("--schedule", choices=tuple(STRESS_BASELINES), default="per-step")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="root-calibrate's cache")
    parser.add_argument(
        "--held-out-cache", type=Path, default=default_cache_dir(), help="precision.py's cache"
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = STRESS_BASELINES[args.schedule]
    lines = [
        f"Command: `python benchmarks/candidates.py --shapes {args.shapes} --schedule {args.schedule} "
        f"--iterations {args.iterations}`; ratios to {baseline} on the independent sets (worst: the worst "
        "phase/optimizer group); bold: the candidate with the lower validation error, which the CLI ships.",
        "",
        f"| shape | validation: robust / guarded ({baseline}) | pick | set 1: robust / guarded | set 1 worst "
        "group | set 2: robust / guarded | set 2 worst group | fit s: robust / guarded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in parse_shapes(args.shapes):
        lines.append(shape_row(key, args))
        print(lines[-1], file=sys.stderr, flush=True)  # progress: a row per shape as it is done
    publish("#### candidates\n\n" + "\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
