"""ROOT vs torch.optim.Muon step time on the matrices of a LLaMA-style block, side by side in one run.

Also times the soft-threshold against the Newton–Schulz call it precedes, at each shape. Runs are
interleaved (ROOT, Muon, ROOT, …) so drifts in machine load hit both; medians are reported.

    .venv/bin/python benchmarks/optimizer_step.py                       # 4096×4096, 4096×11008, 11008×4096
    .venv/bin/python benchmarks/optimizer_step.py --scale 0.25 --repeats 3 --record
    .venv/bin/python benchmarks/optimizer_step.py --device cuda --repeats 20 --record
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
from torch import nn

from root_core import ROOT, orthogonalize
from root_core.newton_schulz import default_ns_dtype
from root_core.outliers import clip_to_quantile

LLAMA_BLOCK = [(4096, 4096), (4096, 11008), (11008, 4096)]  # attention out, MLP up, MLP down (LLaMA-2-7B)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def make_optimizers(shapes, device, ns_dtype, table):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    runs = {}
    for name in ("ROOT", "Muon"):
        params = [nn.Parameter(w.to(device)) for w in weights]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device)
        if name == "ROOT":
            runs[name] = ROOT(params, lr=0.02, table=table, ns_dtype=ns_dtype)
        else:
            runs[name] = torch.optim.Muon(params, lr=0.02)
    return runs


def bench_steps(runs, device, repeats):
    times = {name: [] for name in runs}
    for optimizer in runs.values():  # warm-up: allocator, kernels, lazy state
        timed(optimizer.step, device)
    for _ in range(repeats):
        for name, optimizer in runs.items():
            times[name].append(timed(optimizer.step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_threshold_share(shape, device, ns_dtype, repeats):
    M = torch.randn(shape, device=device)
    rows = [(3.4445, -4.7750, 2.0315)]
    clip = [timed(lambda: clip_to_quantile(M, 0.9), device) for _ in range(repeats + 1)][1:]
    ns = [timed(lambda: orthogonalize(M, rows, dtype=ns_dtype), device) for _ in range(repeats + 1)][1:]
    return statistics.median(clip), statistics.median(ns)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (smoke runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table", default="root-paper")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    # torch.optim.Muon always iterates in bf16, so ROOT runs in bf16 too: same dtype, same work.
    ns_dtype = torch.bfloat16
    shapes = [(max(1, int(m * args.scale)), max(1, int(n * args.scale))) for m, n in LLAMA_BLOCK]

    step = bench_steps(make_optimizers(shapes, device, ns_dtype, args.table), device, args.repeats)
    lines = [
        f"### optimizer_step — {dt.date.today()} — {machine(device)} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/optimizer_step.py --device {args.device} --scale {args.scale} "
        f"--repeats {args.repeats} --table {args.table}`; NS in bf16 for both (Muon's fixed dtype), "
        f"ROOT with soft-threshold at q=0.9; medians of {args.repeats} interleaved steps.",
        "",
        "| shapes | ROOT step (s) | Muon step (s) | ROOT / Muon |",
        "|---|---|---|---|",
        f"| {', '.join(f'{m}×{n}' for m, n in shapes)} | {step['ROOT']:.4f} | {step['Muon']:.4f} | "
        f"{step['ROOT'] / step['Muon']:.3f} |",
        "",
        "| shape | soft-threshold (s) | NS, 5 steps bf16 (s) | threshold / NS |",
        "|---|---|---|---|",
    ]
    for shape in shapes:
        clip, ns = bench_threshold_share(shape, device, ns_dtype, args.repeats)
        lines.append(f"| {shape[0]}×{shape[1]} | {clip:.4f} | {ns:.4f} | {clip / ns:.1%} |")
    fp32_clip, fp32_ns = bench_threshold_share(
        shapes[1],
        device,
        default_ns_dtype(device) if device.type == "cuda" else torch.float32,
        max(1, args.repeats // 2),
    )
    lines.append(
        f"| {shapes[1][0]}×{shapes[1][1]} (NS in {'bf16' if device.type == 'cuda' else 'float32'},"
        f" the device default) | {fp32_clip:.4f} | {fp32_ns:.4f} | {fp32_clip / fp32_ns:.1%} |"
    )
    report = "\n".join(lines) + "\n"
    publish(report, args.record)


if __name__ == "__main__":
    main()
