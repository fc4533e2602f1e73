"""How deep is the small-σ tail of harvested momentum, per probe and training phase?

For each shape and probe (calibration's DEFAULT_PROBES and the precision benchmark's HELD_OUT_PROBES),
one harvest run records an early, a middle and a late snapshot (``record_plan`` with one probe); each
matrix is clipped at q=0.9 as ROOT clips it, and the report gives the share of its singular values
below 1e-3 and 1e-2 of σ_max, and σ_min/σ_max. That tail is where Newton–Schulz coefficients fitted on
well-conditioned momentum lose to Polar Express.

    python benchmarks/harvest_tails.py --shapes 256x256,256x768,256x1024 --record
    python benchmarks/harvest_tails.py --shapes 16x48 --steps 8 --probes llama-muon
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from results import publish

from calibrate.errors import CalibrationError
from calibrate.sampling.harvest import PHASES, harvest, resolve_steps
from calibrate.sampling.probes import DEFAULT_PROBES, HELD_OUT_PROBES, parse_probes
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum

CLIP_QUANTILE = 0.9  # what ROOT and the bundled tables use
THRESHOLDS = (1e-3, 1e-2)  # of σ_max


def tail_statistics(matrix: torch.Tensor) -> tuple[float, float, float]:
    """(share of σ < 1e-3·σ_max, share < 1e-2·σ_max, σ_min/σ_max) of the clipped matrix."""
    sigma = normalized_spectrum(matrix, clip_quantile=CLIP_QUANTILE)
    relative = sigma / sigma.max()
    shares = [float((relative < t).double().mean()) for t in THRESHOLDS]
    return shares[0], shares[1], float(relative.min())


def probe_rows(key, probe: str, args) -> list[str]:
    steps = resolve_steps(key, len(PHASES), args.steps, probes=[probe])
    started = time.perf_counter()
    samples = harvest(key, len(PHASES), seed=args.seed, corpus=args.corpus, steps=steps, probes=[probe])
    print(f"{format_shape(key)} {probe}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for sample in sorted(samples, key=lambda s: s.meta["step"]):
        below_3, below_2, ratio = tail_statistics(sample.matrix)
        rows.append(
            f"| {format_shape(key)} | {probe} | {sample.meta['phase']} | {sample.meta['step']}/{steps} | "
            f"{sample.meta['layer']} | {below_3:.1%} | {below_2:.1%} | {ratio:.1e} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="256x256,256x768,256x1024", help="comma-separated MxN shapes")
    parser.add_argument("--probes", default=",".join(DEFAULT_PROBES + HELD_OUT_PROBES))
    parser.add_argument("--steps", type=int, default=None, help="run length (default: the harvester's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=None, help="default: the Python standard library")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    try:
        keys = parse_shapes(args.shapes)
        probes = parse_probes(args.probes)
    except CalibrationError as error:
        sys.exit(f"error: {error}")
    lines = [
        f"### harvest_tails — {dt.date.today()} — cpu ({platform.machine()}, {torch.get_num_threads()} "
        f"threads) — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/harvest_tails.py {shlex.join(sys.argv[1:])}`. Harvest seed "
        f"{args.seed}, corpus `{args.corpus or 'stdlib'}`; each matrix clipped at q={CLIP_QUANTILE}; "
        "shares of its singular values below 1e-3 and 1e-2 of σ_max.",
        "",
        "| shape | probe | phase | step / run | layer | σ < 1e-3 σ_max | σ < 1e-2 σ_max | σ_min/σ_max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        for probe in probes:
            lines += probe_rows(key, probe, args)
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
