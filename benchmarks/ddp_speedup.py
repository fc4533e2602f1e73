"""ROOT's DDP split of the Newton–Schulz work: 2 ranks against 1 process, side by side in one run (CPU).

The hidden matrices of LLaMA-3.2-1B-style blocks (q, k, v, o, gate, up, down; --scale shrinks every
dimension) are replicated parameters with identical gradients, as under DDP. Three gloo processes take
turns, one configuration at a time (a barrier between), in rotating order each round:

* ``1 process, 1 thread``: rank 0 steps its own copy with ``data_parallel=False``;
* ``1 process, 2 threads``: rank 2 does the same with two intra-op threads — what the cores give
  without a split (a separate process: changing a process's thread count costs seconds);
* ``2 ranks × 1 thread``: ranks 0 and 1 step with the split (each orthogonalises its share, then one
  ``all_gather`` per shape), which is what DDP training runs.

Reported: medians of wall time and of CPU time (the busiest process; all threads) per step. The whole
ROOT step is timed (momentum, clip at q=0.9, NS in float32, all-gather); the split shares the clip and NS.

    .venv/bin/python benchmarks/ddp_speedup.py                       # scale 0.25, 2 blocks, 5 rounds
    .venv/bin/python benchmarks/ddp_speedup.py --scale 0.5 --repeats 7 --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from results import publish
from torch import nn

from root_core import ROOT

# Ranks 0 and 1 split the work; rank 2 is the 2-thread baseline.
PROCESSES = 3
# Measured: a 2-thread process's first steps were 100× slower on a busy machine, then settled.
WARMUP_ROUNDS = 2
# Hidden matrices of one LLaMA-3.2-1B block (meta-llama/Llama-3.2-1B config: hidden 2048, 32 heads of 64,
# 8 kv heads, MLP 8192), as (out, in) weights: q, k, v, o, gate, up, down.
LLAMA_1B_BLOCK = [
    (2048, 2048),
    (512, 2048),
    (512, 2048),
    (2048, 2048),
    (8192, 2048),
    (8192, 2048),
    (2048, 8192),
]
CONFIGS = ("1 process, 1 thread", "1 process, 2 threads", "2 ranks × 1 thread (DDP split)")
# A round at the default size takes seconds; a rank that waits longer than this for its peer has hung.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def layer_shapes(scale: float, blocks: int) -> list[tuple[int, int]]:
    return [(max(1, int(m * scale)), max(1, int(n * scale))) for m, n in LLAMA_1B_BLOCK] * blocks


def make_optimizer(shapes, data_parallel) -> ROOT:
    """Identical weights and gradients on every rank (replicated parameters, as under DDP)."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    return ROOT(params, lr=0.02, table="muon", ns_dtype=torch.float32, data_parallel=data_parallel)


def timed_step(optimizer: ROOT) -> tuple[float, float]:
    """(wall, CPU) seconds of one step; CPU time (all threads) shows the work even on a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(rank: int, shapes, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) per round and configuration, each measured by the process that owns it.

    Ranks 0 and 1 (1 thread each) form the split's group, and rank 0 also steps alone; rank 2 steps
    alone with 2 threads. A process's thread count stays fixed: changing it costs seconds per call.
    Idle ranks wait at the barrier, which gloo does without spinning.
    """
    group = dist.new_group([0, 1])
    split = make_optimizer(shapes, data_parallel=group) if rank < 2 else None
    alone = make_optimizer(shapes, data_parallel=False) if rank != 1 else None
    runs = {CONFIGS[0]: {0: alone}, CONFIGS[1]: {2: alone}, CONFIGS[2]: {0: split, 1: split}}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for round_ in range(repeats + WARMUP_ROUNDS):
        # The first rounds warm up (allocator, lazy state, the 2-thread pool) and are dropped.
        order = CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]  # no configuration always runs first
        for name in order:
            dist.barrier()
            if rank in runs[name]:
                measured = timed_step(runs[name][rank])
                if round_ >= WARMUP_ROUNDS:
                    times[name].append(measured)
    every: list = [None] * PROCESSES
    dist.all_gather_object(every, times)
    # Rank 0's wall time (the split ends in an all-gather, so both ranks finish together) and the
    # busier rank's CPU time for the split.
    split_times = [
        (wall, max(cpu, every[1][CONFIGS[2]][i][1])) for i, (wall, cpu) in enumerate(every[0][CONFIGS[2]])
    ]
    return {CONFIGS[0]: every[0][CONFIGS[0]], CONFIGS[1]: every[2][CONFIGS[1]], CONFIGS[2]: split_times}


def worker(rank: int, store: str, shapes, repeats: int, results: Path) -> None:
    torch.set_num_threads(2 if rank == 2 else 1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=PROCESSES, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        times = measure(rank, shapes, repeats)
        if rank == 0:
            torch.save(times, results)
    finally:
        dist.destroy_process_group()


def run_ranks(shapes, repeats: int) -> dict[str, list[tuple[float, float]]]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "times.pt"
        args = (str(Path(tmp) / "store"), shapes, repeats, results)
        workers = [context.Process(target=worker, args=(rank, *args)) for rank in range(PROCESSES)]
        for process in workers:
            process.start()
        for process in workers:
            process.join()
        failed = [p.exitcode for p in workers if p.exitcode != 0]
        if failed or not results.exists():
            raise SystemExit(f"a rank failed (exit codes {[p.exitcode for p in workers]})")
        return torch.load(results)


def report(times: dict[str, list[tuple[float, float]]], shapes, args, load: tuple[float, float]) -> str:
    wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    lines = [
        f"### ddp_speedup — {dt.date.today()} — cpu ({platform.machine()}, {multiprocessing.cpu_count()} "
        f"cores) — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/ddp_speedup.py --scale {args.scale} --blocks {args.blocks} "
        f"--repeats {args.repeats}`. Matrices: {', '.join(f'{c}× {m}×{n}' for (m, n), c in counts.items())} "
        f"(LLaMA-3.2-1B blocks at scale {args.scale}); whole ROOT step, NS in float32, table `muon`, "
        f"clip q=0.9; gloo processes on one machine (2 for the split, 1 per baseline); "
        f"medians of {args.repeats} interleaved rounds. "
        # Other work on the cores changes these numbers (2 threads suffer most), so the load is recorded.
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after.",
        "",
        "| configuration | step, wall (s) | CPU of the busiest process (s) | split's wall-time speed-up |",
        "|---|---|---|---|",
    ]
    for name in CONFIGS:
        speedup = "—" if name == CONFIGS[2] else f"{wall[name] / wall[CONFIGS[2]]:.2f}×"
        lines.append(f"| {name} | {wall[name]:.4f} | {cpu[name]:.4f} | {speedup} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=0.25, help="multiply every dimension")
    parser.add_argument("--blocks", type=int, default=2, help="LLaMA blocks (more matrices balance better)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    if args.scale <= 0 or args.blocks < 1 or args.repeats < 1:
        parser.error("--scale must be > 0, --blocks and --repeats ≥ 1")
    shapes = layer_shapes(args.scale, args.blocks)
    before = os.getloadavg()[0]
    times = run_ranks(shapes, args.repeats)
    publish(report(times, shapes, args, (before, os.getloadavg()[0])), args.record)


if __name__ == "__main__":
    main()
