"""Gram vs standard Newton–Schulz (time, error against SVD), and the soft-threshold's share of one NS call.

Four tables (issue 13):

1. Time of one ``orthogonalize`` call per form at each ``--shapes`` entry, in ``--dtype``, Polar
   Express rows; the calls alternate (standard, Gram, Gram, standard, …) so load drifts hit both; medians,
   and the flop ratio the cost model predicts (``gram_newton_schulz``'s docstring).
2. Error of each form against a float64 SVD of the same matrix, for Polar Express's and Muon's rows:
   against the polar factor U Vᵀ (what NS is for), and against U·P(Σ)·Vᵀ (what these rows give in
   exact arithmetic, so only rounding is left). Inputs: Gaussian matrices clipped at the 0.9-quantile,
   as ROOT feeds NS.
3. The soft-threshold at the last shape before issue 13 (a banded selection per matrix, with host
   syncs; copied below to keep it measurable) and now (one batched ``topk``), as a share of one NS call.
4. At ``--precision-shapes`` (small), the error of the Gram form relative to the standard form's, in
   float32, fp16 and bf16, with no restarts, the default ones and a restart after every step, for
   Gaussian and power-law (σ_i = i⁻², then clipped) inputs and a 10-step schedule.

    .venv/bin/python benchmarks/ns_forms.py --record
    .venv/bin/python benchmarks/ns_forms.py --shapes 64x256 --repeats 1 --precision-shapes 32x96
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import os
import statistics

import torch
from results import publish
from timing import machine, timed

from root_core import load_table, orthogonalize
from root_core.newton_schulz import default_gram_restarts
from root_core.outliers import clip_to_quantile
from root_core.schedule import Schedule
from root_core.spectral import compose

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# DeepSeek-V4's 10 steps (docs/design.md §5): where restarts matter most.
DEEPSEEK_V4 = Schedule(rows=((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2)


def predicted_speedup(m: int, n: int, steps: int, restarts: tuple[int, ...]) -> float:
    """Standard flops / Gram flops: K(4m²n + 2m³) against Σ over segments of 4m²n + (8L − 6)m³."""
    m, n = min(m, n), max(m, n)
    bounds = [0, *restarts, steps]
    gram = sum(4 * m * m * n + (8 * (b - a) - 6) * m**3 for a, b in itertools.pairwise(bounds))
    return steps * (4 * m * m * n + 2 * m**3) / gram


def legacy_abs_quantile(M: torch.Tensor, quantile: float) -> torch.Tensor:
    """The threshold as computed before issue 13 (commit 382a0de) for matrices of ≥ 2¹⁸ elements:
    per matrix, a strided sample brackets rank k, one pass counts below the bracket, a boolean mask
    compacts the band (a host sync each), kthvalue selects inside it."""
    flat = M.detach().reshape(-1, M.shape[-2] * M.shape[-1]).abs().float()
    rank = quantile * (flat.shape[-1] - 1)
    k, fraction = math.floor(rank), rank - math.floor(rank)
    thresholds = []
    for values in flat:  # one Python iteration and several syncs per matrix
        count = values.numel()
        stride = max(1, count // 2**16)
        while math.gcd(stride, M.shape[-1]) != 1:
            stride += 1
        sample = values[::stride].sort().values
        q, last = k / (count - 1), sample.numel() - 1
        margin = 8.0 * math.sqrt(q * (1 - q) / sample.numel()) + 2.0 / sample.numel()
        lo, hi = (
            sample[max(0, math.floor((q - margin) * last))],
            sample[min(last, math.ceil((q + margin) * last))],
        )
        below_mask = values < lo
        below = int(torch.count_nonzero(below_mask))
        band = values[(values <= hi) ^ below_mask]
        lower = band.kthvalue(k - below + 1).values
        upper = band.kthvalue(min(k + 1, count - 1) - below + 1).values
        thresholds.append(torch.lerp(lower, upper, fraction))
    return torch.stack(thresholds).reshape(*M.shape[:-2], 1, 1)


def legacy_clip(M: torch.Tensor, quantile: float) -> torch.Tensor:
    epsilon = legacy_abs_quantile(M, quantile)
    return torch.clamp(M, min=-epsilon, max=epsilon)


def clipped_gaussian(m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return clip_to_quantile(torch.randn(m, n, generator=generator), 0.9).to(device)


def power_law(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """σ_i = i⁻², a deep small-σ tail like clipped momentum's (docs/design.md §5), then clipped."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))
    return clip_to_quantile((U * torch.arange(1, m + 1, dtype=torch.float64) ** -2.0) @ V.T, 0.9)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def svd_references(G: torch.Tensor, schedules: dict[str, Schedule]) -> tuple[torch.Tensor, dict]:
    """U Vᵀ, and U·P(Σ/(scale·‖G‖_F))·Vᵀ per schedule, from one float64 SVD (on the CPU)."""
    G64 = G.double().cpu()
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    sigma = S / G64.norm()
    exact = {name: (U * compose(sigma, schedule)) @ Vh for name, schedule in schedules.items()}
    return U @ Vh, exact


def speed_lines(shapes, device, dtype, repeats, schedule) -> tuple[list[str], dict[str, float]]:
    """The timing table, and the last shape's median per form (the threshold's denominators)."""
    restarts = default_gram_restarts(schedule.num_steps)
    lines = [
        "| shape | standard (s) | Gram (s) | standard / Gram | flop model | restarts after |",
        "|---|---|---|---|---|---|",
    ]
    for m, n in shapes:
        G = clipped_gaussian(m, n, device)
        calls = {
            "standard": lambda G=G: orthogonalize(G, schedule, dtype=dtype),
            "gram": lambda G=G: orthogonalize(G, schedule, dtype=dtype, form="gram"),
        }
        if device.type == "cuda" or m * n < 2**22:  # first-call costs matter only to small or CUDA runs
            for call in calls.values():
                timed(call, device)
        times = {name: [] for name in calls}
        for repeat in range(repeats):
            order = list(calls) if repeat % 2 == 0 else list(reversed(calls))  # drift hits both alike
            for name in order:
                times[name].append(timed(calls[name], device))
        median = {name: statistics.median(values) for name, values in times.items()}
        lines.append(
            f"| {m}×{n} | {median['standard']:.3f} | {median['gram']:.3f} | "
            f"**{median['standard'] / median['gram']:.2f}** | "
            f"{predicted_speedup(m, n, schedule.num_steps, restarts):.2f} | {restarts} |"
        )
    return lines, median


def error_lines(shapes, device, dtype, schedules) -> list[str]:
    lines = [
        "| shape | rows | standard vs U Vᵀ | Gram vs U Vᵀ | Gram − standard | standard vs U·P(Σ)·Vᵀ "
        "| Gram vs U·P(Σ)·Vᵀ |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, n in shapes:
        G = clipped_gaussian(m, n, device)
        polar, exact = svd_references(G, schedules)
        for name, schedule in schedules.items():
            standard = orthogonalize(G, schedule, dtype=dtype).cpu()
            gram = orthogonalize(G, schedule, dtype=dtype, form="gram").cpu()
            to_polar = relative_error(standard, polar), relative_error(gram, polar)
            lines.append(
                f"| {m}×{n} | {name} | {to_polar[0]:.5f} | {to_polar[1]:.5f} | "
                f"{to_polar[1] - to_polar[0]:+.1e} | {relative_error(standard, exact[name]):.1e} | "
                f"{relative_error(gram, exact[name]):.1e} |"
            )
    return lines


def threshold_lines(shape, device, repeats, ns: dict[str, float]) -> list[str]:
    """Old and new threshold, interleaved, against the NS medians ``speed_lines`` measured."""
    m, n = shape
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(device)
    calls = {
        "before issue 13: banded selection, per matrix, host syncs": lambda: legacy_clip(G, 0.9),
        "now: one batched topk, no host sync": lambda: clip_to_quantile(G, 0.9),
    }
    assert torch.equal(
        calls["before issue 13: banded selection, per matrix, host syncs"](), clip_to_quantile(G, 0.9)
    )
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call, device))
    lines = [
        f"| soft-threshold at {m}×{n} | time (s) | / NS standard ({ns['standard']:.2f} s) "
        f"| / NS Gram ({ns['gram']:.2f} s) |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {median / ns['standard']:.1%} | {median / ns['gram']:.1%} |")
    return lines


def precision_lines(shapes, schedules) -> list[str]:
    """Gram error / standard error in the same dtype (1.00 = as accurate), per restart choice."""
    lines = [
        "| shape | input | rows | dtype | standard vs U·P(Σ)·Vᵀ | Gram, no restart | Gram, default "
        "| Gram, every step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, n in shapes:
        inputs = {
            "Gaussian": clip_to_quantile(torch.randn(m, n, dtype=torch.float64), 0.9),
            "power law": power_law(m, n),
        }
        for kind, G in inputs.items():
            _, exact = svd_references(G, schedules)
            for name, schedule in schedules.items():
                steps = schedule.num_steps
                options = {"no restart": (), "default": None, "every step": tuple(range(1, steps))}
                for dtype_name, dtype in DTYPES.items():
                    standard = relative_error(orthogonalize(G.float(), schedule, dtype=dtype), exact[name])
                    ratios = []
                    for restarts in options.values():
                        out = orthogonalize(G.float(), schedule, dtype=dtype, form="gram", restarts=restarts)
                        error = relative_error(out, exact[name])
                        ratios.append(f"{error / standard:.2f}" if math.isfinite(error) else "NaN")
                    lines.append(
                        f"| {m}×{n} | {kind} | {name} | {dtype_name} | {standard:.1e} | "
                        + " | ".join(ratios)
                        + " |"
                    )
    return lines


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in item.split("x")) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--shapes", default="2048x8192,4096x11008", help="timing and SVD-error shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision-shapes", default="256x1024,512x1376,256x256")
    parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes)
    polar_express, muon = load_table("polar-express"), load_table("muon")
    schedules = {
        "Polar Express": polar_express.schedule_for(shapes[-1]),
        "Muon": muon.schedule_for(shapes[-1]),
    }
    started = os.getloadavg()[0]
    speed, ns_medians = speed_lines(shapes, device, dtype, args.repeats, schedules["Polar Express"])
    lines = [
        f"### ns_forms — {dt.date.today()} — {machine(device)} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/ns_forms.py --device {args.device} --dtype {args.dtype} --shapes "
        f"{args.shapes} --repeats {args.repeats} --precision-shapes {args.precision_shapes}`; medians of "
        f"{args.repeats} interleaved calls, 5 steps, Polar Express rows for the timings.",
        "",
        *speed,
        "",
        *threshold_lines(shapes[-1], device, max(args.repeats, 5), ns_medians),
        "",
        *error_lines(shapes, device, dtype, schedules),
        "",
        *precision_lines(
            parse_shapes(args.precision_shapes), {**schedules, "DeepSeek-V4 (10 steps)": DEEPSEEK_V4}
        ),
        "",
        f"Load average (1 min) at start / end: {started:.2f} / {os.getloadavg()[0]:.2f}.",
    ]
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
