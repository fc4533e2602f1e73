"""How good can any table be on held-out momentum? Fit directly on it, and compare with the published sets.

A table calibrated elsewhere can at best match a schedule fitted on the held-out matrices themselves (same
step count, same bound on P). That "oracle" is a lower bound on the held-out error of any calibrated
table, so it says which precision targets are reachable at all: if the oracle per-step error is above half
of Polar Express's, no calibration can reach "half of Polar Express" on that momentum. Held-out momentum
and its cache are the ones ``precision.py`` uses: ``--set held-out`` (the calibration harvester's probes
on another seed and corpus), ``--set independent`` (probes of another family and optimizers, early to
late) or ``--set independent-2`` (precision.py's second independent set: another family, optimizers, seed
and corpus again). With ``--table``, each shape also gets that table's error and the share of the headroom
it captures, (PE − ours) / (PE − oracle per-step): 1 is as good as any table can be, 0 no better than
Polar Express, below 0 worse. With ``--robust-oracle``, each shape also gets the robust oracle: the
default robust fit (Polar Express's error as a hard constraint on the stress sets of these matrices) run
on the held-out matrices themselves, and its headroom, which is the most any robust table can capture
there: a robust table fitted elsewhere can at best match it.

    python benchmarks/precision_ceiling.py --shapes 2048x8192,4096x11008 --record
    python benchmarks/precision_ceiling.py --set independent --table qwen2.5-0.5b --shapes 896x4864
    python benchmarks/precision_ceiling.py --shapes 64x256 --count 2 --steps 20 --iterations 5
    python benchmarks/precision_ceiling.py --set independent --robust-oracle --shapes 128x896
    python benchmarks/precision_ceiling.py --set independent-2 --robust-oracle --shapes 128x896
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
from precision import (
    HELD_OUT_SEED,
    INDEPENDENT_COUNT,
    INDEPENDENT_SETS,
    MISSING,
    held_out_corpus,
    held_out_samples,
    independent_samples,
    second_independent_samples,
)
from results import publish

from calibrate.cli import default_cache_dir
from calibrate.errors import CalibrationError
from calibrate.fitting.fit import FitSettings, fit
from calibrate.fitting.objective import DEFAULT_MAX_GAIN, ROUNDING_MARGIN, sample_errors, stack_spectra
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table

CLIP_QUANTILE = 0.9  # what ROOT and the bundled tables use


SETS = {
    "held-out": held_out_samples,
    "independent": partial(independent_samples, which=1),
    "independent-2": second_independent_samples,
}


def set_source(args) -> str:
    """The harvest seed and corpus of the chosen set, for the report's header."""
    if args.set == "independent-2":
        second = INDEPENDENT_SETS[2]
        return f"harvest seed {second.seed}, corpus: {second.corpus_label}"
    return f"harvest seed {HELD_OUT_SEED}, corpus `{args.corpus.name}`"


def headroom(polar: float, ours: float, oracle: float) -> str:
    """(PE − ours) / (PE − oracle): the share of what any table could gain over PE that ours gains."""
    return MISSING if polar - oracle <= 0 else f"{(polar - ours) / (polar - oracle):.2f}"


def ceiling_row(key, args, table) -> str:
    samples = SETS[args.set](key, args)
    spectra = stack_spectra([normalized_spectrum(s.matrix, clip_quantile=CLIP_QUANTILE) for s in samples])
    polar = float(sample_errors(spectra, load_table("polar-express").schedule_for(key)).mean())
    muon = float(sample_errors(spectra, load_table("muon").schedule_for(key)).mean())
    oracle = {}
    for form in ("per-step", "shared"):
        # The mean fit: the robust default would also hold the rows to Polar Express on stress sets,
        # which is a constraint on top of the best mean error, not the best mean error.
        settings = FitSettings(
            form=form, iterations=args.iterations, max_gain=args.max_gain, criterion="mean"
        )
        oracle[form] = float(sample_errors(spectra, fit(spectra, settings).schedule).mean())
    reachable = "yes" if oracle["per-step"] <= polar / 2 else "**no**"
    robust = ""
    if args.robust_oracle:
        # The CLI's default criterion, with its stress sets built from these very matrices: per-step held
        # to Polar Express, shared held to Muon (where the stress constraint binds at Muon's own triple,
        # no robust shared table can beat Muon there).
        errors = {}
        for form in ("per-step", "shared"):
            settings = FitSettings(form=form, iterations=args.iterations, max_gain=args.max_gain)
            errors[form] = float(sample_errors(spectra, fit(spectra, settings).schedule).mean())
        robust = (
            f" {errors['per-step']:.4f} ({errors['per-step'] / polar:.2f}×) | "
            f"{headroom(polar, errors['per-step'], oracle['per-step'])} | "
            f"{errors['shared']:.4f} ({errors['shared'] / muon:.3f}×) |"
        )
    print(f"{format_shape(key)}: {len(samples)} {args.set} matrices", flush=True)
    row = (
        f"| {format_shape(key)} | {len(samples)} | {polar:.4f} | {oracle['per-step']:.4f} "
        f"({oracle['per-step'] / polar:.2f}×) | {reachable} | {muon:.4f} | {oracle['shared']:.4f} "
        f"({oracle['shared'] / muon:.2f}×) |{robust}"
    )
    if table is None:
        return row
    if key not in table.shapes:
        return row + f" {MISSING} | {MISSING} |"
    ours = float(sample_errors(spectra, table.schedule_for(key)).mean())
    return row + f" {ours:.4f} | {headroom(polar, ours, oracle['per-step'])} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", required=True, help="comma-separated MxN shapes")
    parser.add_argument("--count", type=int, default=4, help="held-out matrices per shape")
    parser.add_argument("--set", choices=tuple(SETS), default="held-out", help="which held-out momentum")
    parser.add_argument(
        "--independent-count",
        type=int,
        default=INDEPENDENT_COUNT,
        help="matrices per shape, --set independent or independent-2",
    )
    parser.add_argument("--table", help="a calibrated table: its error and the headroom it captures")
    parser.add_argument("--steps", type=int, default=None, help="harvest training steps")
    parser.add_argument("--iterations", type=int, default=60, help="search generations of each fit")
    parser.add_argument("--max-gain", type=float, default=DEFAULT_MAX_GAIN)
    parser.add_argument("--corpus", type=Path, default=held_out_corpus())
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="held-out harvest cache")
    parser.add_argument(
        "--robust-oracle",
        action="store_true",
        help="also fit the default robust criterion on the held-out matrices: the most a robust table gets",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    try:
        keys = parse_shapes(args.shapes)
        table = load_table(args.table) if args.table else None
    except (CalibrationError, ValueError, LookupError) as error:
        sys.exit(f"error: {error}")
    ours = f" {table.name}@{table.version} per shape | headroom captured |" if table else ""
    robust = (
        " robust oracle (÷ PE) | headroom of the robust oracle | robust shared oracle (÷ Muon) |"
        if args.robust_oracle
        else ""
    )
    lines = [
        f"### precision_ceiling — {dt.date.today()} — cpu ({platform.machine()}, "
        f"{torch.get_num_threads()} threads) — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/precision_ceiling.py {shlex.join(sys.argv[1:])}`. {args.set} momentum: "
        f"{set_source(args)}, clipped at q={CLIP_QUANTILE}; 5 steps, "
        f"max P {args.max_gain} under the fit's {ROUNDING_MARGIN:.0%} rounding margin. Oracle = a schedule "
        "fitted on these very matrices under the same bound: no table can do better. Headroom captured = "
        "(PE − ours) / (PE − oracle per-step).",
        "",
        "| shape | matrices | Polar Express | oracle per-step (÷ PE) | ≤ ½ PE reachable? | Muon | "
        f"oracle shared (÷ Muon) |{robust}{ours}",
        "|---|---|---|---|---|---|---|"
        + "---|---|---|" * bool(args.robust_oracle)
        + "---|---|" * bool(table),
    ]
    lines += [ceiling_row(key, args, table) for key in keys]
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
