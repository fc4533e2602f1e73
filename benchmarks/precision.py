"""Precision on held-out real momentum: calibrated tables against the published coefficient sets.

Held-out means calibration never saw it: momentum harvested with another seed from another corpus
(default: the installed torch package's Python sources, where calibration trains on the standard
library). Every matrix is clipped as the optimizer clips it (q=0.9 unless the table says otherwise),
then scored at 5 steps: the float64 spectral error for all held-out matrices, and the measured bf16
matrix error of ``orthogonalize`` against the SVD polar factor for the first ``--matrix-count``.

    python benchmarks/precision.py --table llama-3.2-1b --table llama-3.2-1b-shared --record
    python benchmarks/precision.py --table tiny --shapes 64x256 --count 4 --steps 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from pathlib import Path

import torch
from results import publish

from calibrate.evaluate import matrix_errors
from calibrate.objective import safety, sample_errors, stack_spectra
from calibrate.sampling.harvest import harvest
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table

BASELINES = ("muon", "polar-express", "root-paper")
HELD_OUT_SEED = 1  # calibration harvests with seed 0


def held_out_corpus() -> Path:
    """Python source text that is on every machine with this toolkit, and not the standard library."""
    return Path(torch.__file__).parent


def schedules_for(key, tables):
    """Each calibrated table's rows for the shape, then the baselines (root-paper only where published)."""
    schedules = {}
    for table in tables:
        if key in table.shapes:
            schedules[f"{table.name}@{table.version}"] = table.schedule_for(key)
    for name in BASELINES:
        baseline = load_table(name)
        if not baseline.entries or key in baseline.shapes:
            schedules[name] = baseline.schedule_for(key)
    return schedules


def measure_shape(key, tables, args):
    started = time.perf_counter()
    samples = harvest(key, args.count, seed=HELD_OUT_SEED, corpus=args.corpus, steps=args.steps)
    clip = tables[0].provenance.get("clip_quantile", 0.9)
    spectra = stack_spectra([normalized_spectrum(s.matrix, clip_quantile=clip) for s in samples])
    schedules = schedules_for(key, tables)
    matrix = matrix_errors(
        [s.matrix for s in samples[: args.matrix_count]],
        schedules,
        clip_quantile=clip,
        dtypes={label: ("bfloat16",) for label in schedules},
    )
    rows = []
    for label, schedule in schedules.items():
        errors = sample_errors(spectra, schedule).tolist()
        rows.append(
            (
                label,
                statistics.mean(errors),
                max(errors),
                statistics.mean(matrix[label]["bfloat16"]),
                safety(schedule).high,
            )
        )
    return rows, len(samples), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", action="append", required=True, help="calibrated table(s) to score")
    parser.add_argument("--shapes", help="default: every shape of the first table")
    parser.add_argument("--count", type=int, default=4, help="held-out matrices per shape")
    parser.add_argument("--matrix-count", type=int, default=1, help="of which checked with bf16 matrices")
    parser.add_argument("--steps", type=int, default=None, help="harvest training steps")
    parser.add_argument("--corpus", type=Path, default=held_out_corpus())
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    tables = [load_table(spec) for spec in args.table]
    keys = parse_shapes(args.shapes) if args.shapes else tables[0].shapes
    lines = [
        f"### precision — {dt.date.today()} — cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
        f" — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/precision.py {' '.join('--table ' + t for t in args.table)}"
        f"{' --shapes ' + args.shapes if args.shapes else ''} --count {args.count} "
        f"--matrix-count {args.matrix_count}{' --steps ' + str(args.steps) if args.steps else ''}`. "
        f"Held-out momentum: harvest seed {HELD_OUT_SEED}, corpus `{args.corpus.name}` sources (calibration: "
        "seed 0, stdlib). 5 NS steps; errors relative to the exact polar factor.",
        "",
        "| shape | coefficients | mean spectral error (f64) | worst | bf16 matrix error | max P on [0,1] |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        rows, count, seconds = measure_shape(key, tables, args)
        for label, mean, worst, bf16, bound in rows:
            lines.append(
                f"| {format_shape(key)} | {label} | {mean:.4f} | {worst:.4f} | {bf16:.4f} | {bound:.4f} |"
            )
        print(f"{format_shape(key)}: {count} held-out matrices in {seconds:.0f} s", flush=True)
    report = "\n".join(lines) + "\n"
    publish(report, args.record)


if __name__ == "__main__":
    main()
