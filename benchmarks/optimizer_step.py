"""ROOT vs torch.optim.Muon vs AdamW: step time and memory on a LLaMA block's matrices, side by side.

The matrices are one LLaMA-2-7B decoder block's (q, k, v, o, gate, up, down; the model repeats it 32
times), scaled by --scale. Steps are interleaved (ROOT, Muon, AdamW, ROOT, …) so drifts in machine
load hit all three; medians are reported. Memory per optimizer, measured after the timed steps:
its state (the persistent tensors in ``optimizer.state``) and the step's workspace (the peak of the
bytes a step allocates above what was allocated before it, temporaries included). On CUDA the
workspace is ``torch.cuda.max_memory_allocated`` minus the allocation before the step, after
``reset_peak_memory_stats``; on a CPU it is the same peak, from the allocation and free events that
``torch.profiler`` records with ``profile_memory=True``. Parameters and gradients are the same for
all three and are listed once.

Also times the soft-threshold against the Newton–Schulz call it precedes, at each shape.

With ``--auto-table`` (issue 14), also an auto-step table, whose every shape runs its own step count,
against Polar Express's 5 steps: whole ROOT steps on the block with each table (interleaved, same
weights and gradients), and per shape the NS call's time, its matmul FLOPs, and the error of each set:
on the table's own validation spectra (its metrics) and, measured here, in bf16 against the float64
polar factor on the synthetic matrices root-calibrate generates (one per family, clipped at q=0.9).

    .venv/bin/python benchmarks/optimizer_step.py                       # 4096×4096, 4096×11008, 11008×4096
    .venv/bin/python benchmarks/optimizer_step.py --scale 0.25 --repeats 3 --record
    .venv/bin/python benchmarks/optimizer_step.py --device cuda --repeats 20 --record
    .venv/bin/python benchmarks/optimizer_step.py --scale 0.125 --auto-table my-auto   # auto vs Polar Express
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics

import torch
from results import publish
from timing import machine, timed
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from calibrate.evaluate import matrix_errors
from calibrate.sampling.synthetic import synthetic_sample
from root_core import ROOT, load_table, orthogonalize
from root_core.newton_schulz import default_ns_dtype
from root_core.outliers import clip_to_quantile
from root_core.tables import canonical_shape

# One LLaMA-2-7B decoder block, as nn.Linear weights (out, in): q, k, v, o, then MLP gate, up, down.
LLAMA_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
OPTIMIZERS = ("ROOT", "Muon", "AdamW")
MIB = 2**20


def make_optimizers(shapes, device, ns_dtype, table, names=OPTIMIZERS):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    runs = {}
    for name in names:
        params = [nn.Parameter(w.to(device)) for w in weights]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device)
        if name == "ROOT":
            runs[name] = ROOT(params, lr=0.02, table=table, ns_dtype=ns_dtype)
        elif name == "Muon":
            runs[name] = torch.optim.Muon(params, lr=0.02)
        else:  # the defaults a user gets (foreach where the device supports it)
            runs[name] = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    return runs


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer keeps between steps (momentum, Adam moments, …)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def step_workspace_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Peak bytes one step allocates above the allocation before it (temporaries, NS buffers)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        optimizer.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    return peak_allocation(prof)


def peak_allocation(prof) -> int:
    """Running sum of the profiler's allocation events (frees are negative), in time order: its peak."""
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


def memory_lines(runs, device, shapes) -> list[str]:
    params = sum(m * n for m, n in shapes) * 4  # float32 weights; gradients take as much again
    lines = [
        f"Memory (MiB; parameters {params / MIB:.1f} and gradients {params / MIB:.1f}, the same for all):",
        "",
        "| optimizer | state | step workspace (peak) | state + workspace | vs AdamW |",
        "|---|---|---|---|---|",
    ]
    totals = {}
    for name, optimizer in runs.items():
        state, workspace = state_bytes(optimizer), step_workspace_bytes(optimizer, device)
        totals[name] = (state, workspace)
    for name, (state, workspace) in totals.items():
        adamw = sum(totals["AdamW"])
        lines.append(
            f"| {name} | {state / MIB:.1f} | {workspace / MIB:.1f} | {(state + workspace) / MIB:.1f} | "
            f"{(state + workspace) / adamw:.2f} |"
        )
    return lines


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


def ns_matmul_flops(shape: tuple[int, int], steps: int) -> int:
    """Matmul FLOPs of one standard-form quintic NS call on an m×n matrix (m ≤ n): per step
    A = X Xᵀ (2m²n), A·A (2m³) and (bA + cA²)·X (2m²n)."""
    m, n = min(shape), max(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def auto_step_lines(shapes, device, ns_dtype, spec: str, repeats: int) -> list[str]:
    """The auto-step table against Polar Express's 5 steps: block step time, and per shape NS time,
    FLOPs and errors (see the module docstring)."""
    auto = load_table(spec)
    missing = sorted({canonical_shape(s) for s in shapes} - set(auto.shapes))
    if missing:
        raise SystemExit(f"error: --auto-table {spec} lacks the block's shapes {missing}")
    polar = load_table("polar-express")
    runs = {
        label: make_optimizers(shapes, device, ns_dtype, table, names=("ROOT",))["ROOT"]
        for label, table in (("auto", auto), ("polar-express", polar))
    }
    step = bench_steps(runs, device, repeats)
    lines = [
        f"Auto-step table `{auto.name}@{auto.version}` against Polar Express (5 steps), both in ROOT "
        f"(q=0.9, bf16 NS): whole block steps, medians of {repeats} interleaved steps.",
        "",
        "| shapes | auto step (s) | Polar Express step (s) | auto / Polar Express | NS FLOPs auto / PE |",
        "|---|---|---|---|---|",
    ]
    flops = {label: 0 for label in runs}
    for shape in shapes:
        flops["auto"] += ns_matmul_flops(shape, auto.schedule_for(shape).num_steps)
        flops["polar-express"] += ns_matmul_flops(shape, polar.schedule_for(shape).num_steps)
    lines.append(
        f"| {describe(shapes)} | {step['auto']:.4f} | {step['polar-express']:.4f} | "
        f"{step['auto'] / step['polar-express']:.3f} | {flops['auto'] / flops['polar-express']:.2f} |"
    )
    lines += [
        "",
        f"Per shape: one NS call in bf16 (medians of {NS_CALL_ROUNDS * repeats} interleaved calls, order "
        "alternating), its matmul FLOPs, and the errors "
        "(validation: the table's metrics on its validation spectra; synthetic: bf16 vs the float64 polar "
        f"factor, median over {len(SYNTHETIC_FAMILIES)} synthetic matrices, one per family).",
        "",
        "| shape | steps auto / PE | GFLOP auto / PE | NS auto (s) | NS PE (s) | auto / PE time | "
        "validation error auto / PE | synthetic bf16 error auto / PE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(shapes):
        lines.append(shape_line(shape, auto, polar, device, ns_dtype, repeats))
    return lines


NS_CALL_ROUNDS = 3  # rounds of single NS calls per --repeats
# One matrix per family of root-calibrate's default synthetic mix (calibrate/sampling/synthetic.py).
SYNTHETIC_FAMILIES = ("gaussian", "heavy_tailed", "low_rank_noise", "row_col_scaled")


def shape_line(shape, auto, polar, device, ns_dtype, repeats) -> str:
    schedules = {"auto": auto.schedule_for(shape), "pe": polar.schedule_for(shape)}
    M = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    times = {label: [] for label in schedules}
    # One call is milliseconds here, so more rounds than whole steps get; the order alternates so that
    # neither set always runs first (after the other's allocations); the first round warms up.
    for round_ in range(NS_CALL_ROUNDS * repeats + 1):
        for label in list(schedules)[:: 1 if round_ % 2 else -1]:
            schedule = schedules[label]
            times[label].append(timed(lambda s=schedule: orthogonalize(M, s, dtype=ns_dtype), device))
    ns = {label: statistics.median(values[1:]) for label, values in times.items()}
    matrices = [synthetic_sample(shape, 0, seed=0, family=family).matrix for family in SYNTHETIC_FAMILIES]
    errors = matrix_errors(
        matrices, schedules, clip_quantile=0.9, dtypes={label: ["bfloat16"] for label in schedules}
    )
    synthetic = {label: statistics.median(errors[label]["bfloat16"]) for label in schedules}
    metrics = auto.entry(shape).metrics or {}
    ours = metrics.get("validation_error")
    theirs = metrics.get("baselines", {}).get("polar-express", {}).get("validation_error")
    validation = f"{ours:.4f} / {theirs:.4f}" if ours is not None and theirs is not None else "not recorded"
    steps = {label: schedule.num_steps for label, schedule in schedules.items()}
    giga = {label: ns_matmul_flops(shape, k) / 1e9 for label, k in steps.items()}
    return (
        f"| {shape[0]}×{shape[1]} | {steps['auto']} / {steps['pe']} | "
        f"{giga['auto']:.3g} / {giga['pe']:.3g} | "
        f"{ns['auto']:.4f} | {ns['pe']:.4f} | {ns['auto'] / ns['pe']:.3f} | {validation} | "
        f"{synthetic['auto']:.4f} / {synthetic['pe']:.4f} |"
    )


def auto_args(args) -> str:
    """The options of this run beyond the original four, for the reproducing command."""
    threads = f" --threads {args.threads}" if args.threads is not None else ""
    return threads + (f" --auto-table {args.auto_table}" if args.auto_table else "")


def describe(shapes) -> str:
    """The block's matrices, equal shapes counted: 4× 4096×4096, 2× 11008×4096, 4096×11008."""
    counts = {shape: shapes.count(shape) for shape in shapes}
    return ", ".join(f"{k}× {m}×{n}" if k > 1 else f"{m}×{n}" for (m, n), k in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (smoke runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table", default="root-paper")
    parser.add_argument("--auto-table", help="an auto-step table to time against Polar Express's 5 steps")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's); 1 on a loaded shared machine"
    )
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # torch.optim.Muon always iterates in bf16, so ROOT runs in bf16 too: same dtype, same work.
    ns_dtype = torch.bfloat16
    shapes = [(max(1, int(m * args.scale)), max(1, int(n * args.scale))) for m, n in LLAMA_BLOCK]

    runs = make_optimizers(shapes, device, ns_dtype, args.table)
    step = bench_steps(runs, device, args.repeats)
    lines = [
        f"### optimizer_step — {dt.date.today()} — {machine(device)} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/optimizer_step.py --device {args.device} --scale {args.scale} "
        f"--repeats {args.repeats} --table {args.table}{auto_args(args)}`; NS in bf16 for ROOT and Muon "
        "(Muon's fixed dtype), "
        f"ROOT with soft-threshold at q=0.9; AdamW (lr 1e-3, wd 0.01, torch defaults otherwise); medians "
        f"of {args.repeats} interleaved steps.",
        "",
        "| shapes | ROOT step (s) | Muon step (s) | AdamW step (s) | ROOT / Muon | ROOT / AdamW |",
        "|---|---|---|---|---|---|",
        f"| {describe(shapes)} | {step['ROOT']:.4f} | {step['Muon']:.4f} | {step['AdamW']:.4f} | "
        f"{step['ROOT'] / step['Muon']:.3f} | {step['ROOT'] / step['AdamW']:.1f} |",
        "",
        *memory_lines(runs, device, shapes),
        "",
        "| shape | soft-threshold (s) | NS, 5 steps bf16 (s) | threshold / NS |",
        "|---|---|---|---|",
    ]
    for shape in dict.fromkeys(shapes):  # each distinct shape once, in block order
        clip, ns = bench_threshold_share(shape, device, ns_dtype, args.repeats)
        lines.append(f"| {shape[0]}×{shape[1]} | {clip:.4f} | {ns:.4f} | {clip / ns:.1%} |")
    target = shapes[-1]  # 4096×11008 at scale 1, where the threshold's share is the issue-2 target
    fp32_clip, fp32_ns = bench_threshold_share(
        target,
        device,
        default_ns_dtype(device) if device.type == "cuda" else torch.float32,
        max(1, args.repeats // 2),
    )
    lines.append(
        f"| {target[0]}×{target[1]} (NS in {'bf16' if device.type == 'cuda' else 'float32'},"
        f" the device default) | {fp32_clip:.4f} | {fp32_ns:.4f} | {fp32_clip / fp32_ns:.1%} |"
    )
    if args.auto_table:
        lines += ["", *auto_step_lines(shapes, device, ns_dtype, args.auto_table, args.repeats)]
    report = "\n".join(lines) + "\n"
    publish(report, args.record)


if __name__ == "__main__":
    main()
