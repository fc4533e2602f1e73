"""ROOT's batched step against its matrix-by-matrix step and torch.optim.Muon, on many same-shape matrices.

The parameters are a LLaMA-style stack: ``--layers`` decoder layers of q, k, v, o (hidden × hidden) and,
with ``--ffn F``, gate and up (F × hidden) and down (hidden × F). Three optimizers step them:

* ROOT, batched: today's step, one soft-threshold and one NS call per shape (root_core.optimizer,
  ``BATCH_ELEMENTS``);
* ROOT, per matrix: the same optimizer with a batch budget of one element, so every matrix is clipped
  and orthogonalised on its own, as the step did before issue 13;
* torch.optim.Muon, which steps matrix by matrix;
* ROOT, batched, without the soft-threshold (``outlier_quantile=None``): Muon's arithmetic in batches,
  so that ROOT / Muon splits into the threshold's cost and the step's own.

ROOT runs with its soft-threshold (q = 0.9) and NS in ``--dtype`` (default bf16, torch.optim.Muon's
fixed dtype, so ROOT / Muon compares the same arithmetic). Steps are interleaved (batched, per matrix,
Muon, batched, …) so drifts in machine load hit all three; medians are reported, with the load average
before and after. ``--compile`` adds ROOT's batched step under ``torch.compile(fullgraph=True)`` to the
rotation (compiled before timing; the compile time is reported apart).

On a CPU every matmul is a parallel region of ``--threads`` threads; on a machine busy with other work
each region can wait for a descheduled thread, a cost per call that batching divides by the batch size.
``--threads 1`` measures without that wait (dispatch and kernel overheads only).

    .venv/bin/python benchmarks/batched_step.py                      # 16 layers × q, k, v, o at 256
    .venv/bin/python benchmarks/batched_step.py --threads 1 --record
    .venv/bin/python benchmarks/batched_step.py --hidden 512 --ffn 1376 --compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable

import torch
from results import publish
from timing import load_average
from torch import nn

import root_core.optimizer
from root_core import ROOT


def llama_shapes(layers: int, hidden: int, ffn: int) -> list[tuple[int, int]]:
    """nn.Linear weights (out, in) of each layer: q, k, v, o, then gate, up, down when ffn > 0."""
    attention = [(hidden, hidden)] * 4
    mlp = [(ffn, hidden), (ffn, hidden), (hidden, ffn)] if ffn else []
    return (attention + mlp) * layers


def make_params(shapes, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    return params


def make_runs(shapes, ns_dtype: torch.dtype, compile_step: bool) -> dict[str, Callable[[], object]]:
    runs: dict[str, Callable[[], object]] = {}
    settings = dict(lr=torch.tensor(0.02), ns_dtype=ns_dtype, table="muon")
    runs["ROOT batched"] = ROOT(make_params(shapes), **settings).step
    budget = root_core.optimizer.BATCH_ELEMENTS
    root_core.optimizer.BATCH_ELEMENTS = 1  # layouts are built at construction: every matrix alone
    try:
        runs["ROOT per matrix"] = ROOT(make_params(shapes), **settings).step
    finally:
        root_core.optimizer.BATCH_ELEMENTS = budget
    runs["Muon"] = torch.optim.Muon(make_params(shapes), lr=torch.tensor(0.02)).step
    runs["ROOT batched, no threshold"] = ROOT(make_params(shapes), **settings, outlier_quantile=None).step
    if compile_step:
        runs["ROOT batched, compiled"] = torch.compile(
            ROOT(make_params(shapes), **settings).step, fullgraph=True
        )
    return runs


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(runs, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """First calls (state initialisation, and compilation) apart; then medians of interleaved steps."""
    first = {name: timed(step) for name, step in runs.items()}
    for step in runs.values():  # a second warm-up: a compiled step retraces once its state exists
        step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, step in runs.items():
            times[name].append(timed(step))
    return {name: statistics.median(values) for name, values in times.items()}, first


def describe(shapes) -> str:
    counts = {shape: shapes.count(shape) for shape in shapes}
    return ", ".join(f"{k}× {m}×{n}" for (m, n), k in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=0, help="MLP width (LLaMA: 8/3·hidden); 0: none")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--compile", action="store_true", help="also time the compiled batched step")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    ns_dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.layers, args.hidden, args.ffn)
    load_before = load_average()
    runs = make_runs(shapes, ns_dtype, args.compile)
    step, first = bench(runs, args.repeats)
    load_after = load_average()
    command = (
        f"python benchmarks/batched_step.py --layers {args.layers} --hidden {args.hidden} --ffn {args.ffn} "
        f"--repeats {args.repeats} --dtype {args.dtype}{f' --threads {args.threads}' if args.threads else ''}"
        f"{' --compile' if args.compile else ''}"
    )
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"### batched_step — {dt.date.today()} — {machine} — torch {torch.__version__}",
        "",
        f"Command: `{command}`; {len(shapes)} matrices ({describe(shapes)}); NS in {args.dtype} for ROOT and "
        f"Muon, ROOT with soft-threshold at q=0.9 and Muon's row; medians of {args.repeats} interleaved "
        f"steps; load average (1, 5, 15 min) {load_before} before, {load_after} after.",
        "",
        "| optimizer | step (s) | first step (s) | vs ROOT batched |",
        "|---|---|---|---|",
    ]
    batched = step["ROOT batched"]
    for name in runs:
        lines.append(f"| {name} | {step[name]:.4f} | {first[name]:.2f} | {step[name] / batched:.2f} |")
    lines += [
        "",
        f"per matrix / batched: **{step['ROOT per matrix'] / batched:.2f}**; "
        f"ROOT batched / Muon: **{batched / step['Muon']:.3f}**; "
        f"ROOT per matrix / Muon: {step['ROOT per matrix'] / step['Muon']:.3f}; "
        f"ROOT batched without threshold / Muon: {step['ROOT batched, no threshold'] / step['Muon']:.3f}",
    ]
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
