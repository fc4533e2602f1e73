"""What recording costs ROOT (issue 12 target: ≤ 3% of the step time at record_every=100).

Three ROOTs step the same LLaMA-2-7B decoder block's matrices (q, k, v, o, gate, up, down, scaled by
--scale) with the same gradients, interleaved (plain, recording, recorder idle, plain, …) so drifts in
machine load hit all three; medians are reported:

* plain: no recorder;
* recording: a recorder with every=1, so every step is a recorded one: the float64 spectrum of each
  matrix (Gram product and eigvalsh, root_core/recording.py), the copy to the CPU and the atomic file
  write (into a temporary folder on the local disk);
* idle: a recorder that is not due (every huge): what every other step pays (a step count and a branch).

The overhead at record_every=N is then one recorded step and N − 1 idle ones over N plain ones:
((recording − plain) + (N − 1)·(idle − plain)) / (N·plain). It is not timed as a 100-step run, which would
take 100× the time for the same two differences.

    .venv/bin/python benchmarks/recording_overhead.py --scale 0.125 --repeats 7
    .venv/bin/python benchmarks/recording_overhead.py --scale 0.125 --repeats 7 --record
    .venv/bin/python benchmarks/recording_overhead.py --device cuda --scale 1 --repeats 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time

import torch
from results import publish
from timing import machine, timed
from torch import nn

from root_core import ROOT
from root_core.recording import MomentumRecorder

# One LLaMA-2-7B decoder block, as nn.Linear weights (out, in): q, k, v, o, then MLP gate, up, down.
LLAMA_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
NEVER = 2**62  # a recorder this lazy records step 1 (a warm-up step) and then never again
EVERY = (10, 100, 1000)


def scaled(shapes, scale: float) -> list[tuple[int, int]]:
    return [(max(1, round(m * scale)), max(1, round(n * scale))) for m, n in shapes]


def make_runs(shapes, device, ns_dtype, folder: str) -> dict[str, ROOT]:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    recorders = {
        "plain": None,
        "recording": MomentumRecorder(f"{folder}/recording", every=1),
        "idle": MomentumRecorder(f"{folder}/idle", every=NEVER),
    }
    runs = {}
    for name, recorder in recorders.items():
        params = [nn.Parameter(w.to(device)) for w in weights]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device)
        runs[name] = ROOT(params, lr=0.02, ns_dtype=ns_dtype, recorder=recorder)
    return runs


def bench(runs, device, repeats: int) -> dict[str, float]:
    times = {name: [] for name in runs}
    for optimizer in runs.values():  # warm-up: allocator, kernels, lazy state, the idle recorder's step 1
        timed(optimizer.step, device)
    for _ in range(repeats):
        for name, optimizer in runs.items():
            times[name].append(timed(optimizer.step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def overhead(medians: dict[str, float], every: int) -> float:
    plain, recording, idle = medians["plain"], medians["recording"], medians["idle"]
    return ((recording - plain) + (every - 1) * (idle - plain)) / (every * plain)


def bookkeeping_seconds(calls: int = 100_000) -> float:
    """What an idle step adds, timed directly: the recorder's step count and its branch (the step's
    difference from a plain one is far below the timing noise of whole steps)."""
    with tempfile.TemporaryDirectory() as folder:
        recorder = MomentumRecorder(folder, every=NEVER)
        recorder.begin_step()  # step 1 records
        start = time.perf_counter()
        for _ in range(calls):
            recorder.begin_step()
        return (time.perf_counter() - start) / calls


def describe(shapes) -> str:
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    return ", ".join(f"{n}× {m}×{k}" for (m, k), n in counts.items())


def report(args, shapes, medians, ns_dtype) -> str:
    device = torch.device(args.device)
    lines = [
        f"### Recording overhead: {describe(shapes)} ({dt.date.today()}, {machine(device)}, "
        f"NS in {str(ns_dtype).removeprefix('torch.')})",
        "",
        f"`{' '.join(['python benchmarks/recording_overhead.py', *args.argv])}`; medians of {args.repeats} "
        "interleaved steps.",
        "",
        "| run | step (s) | vs plain |",
        "|---|---|---|",
    ]
    for name, label in (("plain", "plain ROOT"), ("recording", "recorded step"), ("idle", "recorder idle")):
        lines.append(f"| {label} | {medians[name]:.4f} | {medians[name] / medians['plain']:.3f} |")
    recorded = medians["recording"] / medians["plain"] - 1
    idle = medians["idle"] / medians["plain"] - 1
    bookkeeping = medians["bookkeeping"] / medians["plain"]
    lines += [
        "",
        "Overhead at record_every=N, as a share of the plain step time: the recorded step's extra over N, "
        "plus (N − 1)/N of what an idle step adds, measured two ways: whole idle steps against plain ones "
        "(this difference is the timing noise of the run: the work is the same) and the recorder's "
        f"bookkeeping timed directly ({medians['bookkeeping'] * 1e6:.2f} µs per step).",
        "",
        "| record_every | recorded step's extra / N | idle steps vs plain | overhead (idle steps) | "
        "overhead (bookkeeping) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {every} | {recorded / every:+.2%} | {idle * (every - 1) / every:+.2%} | "
        f"{overhead(medians, every):+.2%} | {recorded / every + bookkeeping * (every - 1) / every:+.3%} |"
        for every in EVERY
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (smoke runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.argv = [a for a in (argv if argv is not None else __import__("sys").argv[1:]) if a != "--record"]
    device = torch.device(args.device)
    shapes = scaled(LLAMA_BLOCK, args.scale)
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as folder:
        medians = bench(make_runs(shapes, device, ns_dtype, folder), device, args.repeats)
    medians["bookkeeping"] = bookkeeping_seconds()
    publish(report(args, shapes, medians, ns_dtype), args.record)


if __name__ == "__main__":
    main()
