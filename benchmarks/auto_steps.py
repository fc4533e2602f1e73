"""--steps auto on momentum calibration never saw, and its calibration time (issue 14).

Fewest steps (default): per shape, the same search ``root-calibrate --steps auto --target T`` runs
(``calibrate.fitting.pipeline.search_steps``, on the calibration harvest + synthetic mix from
``--cache``), but continued to 10 steps so the whole frontier is known; the chosen k is the one the CLI
picks (the first that reaches the target; the fits up to it are the CLI's, bit for bit). Then every k's
rows, Polar Express extended by its last row at k = 1…10, Muon (5) and You (6) are scored on the *independent*
held-out momentum of ``benchmarks/precision.py`` (post-LN GQA probes, Muon without Nesterov and AdamW,
the torch sources, seed 1; ``--independent-set 2``: its second set, parallel multi-query probes, Muon at
momentum 0.85 and AdamW at β1 0.8, package-metadata prose, seed 2), clipped as ROOT clips. It reports,
per shape: whether the chosen k reaches the target there, or whether any k ≤ 10 does; how many steps
Polar Express needs for the same error; and the frontier per k with its matmul FLOPs.

Timing (``--timing N``): N fixed-step and N auto runs of the CLI on the same shapes and cache,
alternating, and the median wall time of each.

    python benchmarks/auto_steps.py --arch qwen2.5-0.5b --target 0.1 --cache /tmp/qwen/cache \\
        --held-out-cache /tmp/me/cache --record
    python benchmarks/auto_steps.py --arch qwen2.5-0.5b --timing 3 --cache /tmp/qwen/cache --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from precision import INDEPENDENT_COUNT, held_out_corpus, independent_samples
from results import publish

from calibrate.cli import default_cache_dir
from calibrate.fitting.objective import mean_error, stack_spectra
from calibrate.fitting.pipeline import CalibrationRequest, collect_samples, search_steps
from calibrate.fitting.steps import (
    MAX_AUTO_STEPS,
    auto_iterations,
    ns_matmul_flops,
    parse_target,
    steps_to_reach,
)
from calibrate.progress import stages
from calibrate.sampling.mix import train_validation_split
from calibrate.shapes import format_shape, parse_shapes, resolve_shapes
from calibrate.spectra import SpectrumCache, normalized_spectrum
from root_core import load_table
from root_core.schedule import Schedule

CLIP = 0.9  # ROOT's and calibration's default soft-threshold quantile
# "Rectangular MLP shapes": with --arch, the shapes of the preset's mlp.* layers; with --shapes, those
# whose long side is at least this many times the short one (LLaMA/Qwen MLPs: 2.7–5.4×).
MLP_ASPECT = 2.5


def machine() -> str:
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def frontier_for(key, args) -> tuple[dict, torch.Tensor]:
    """The CLI's auto search at one shape, continued to MAX_AUTO_STEPS; and the held-out spectra."""
    request = CalibrationRequest(
        shapes=[key],
        out=Path(tempfile.gettempdir()),
        name="bench",
        target=parse_target(args.target),
        cache_dir=args.cache,
        harvest_steps=args.harvest_steps,
        samples=args.samples,
    )
    request.fit.iterations = args.iterations
    cache = SpectrumCache(args.cache / "spectra" if args.cache else None)
    with stages(True) as quiet:
        samples = collect_samples(key, request, quiet, [])
        calibration, validation = train_validation_split(samples, request.validation_fraction, seed=0)
        by_sample = {id(s): cache.spectrum(s.matrix, clip_quantile=CLIP) for s in samples}
        spectra = [[by_sample[id(s)] for s in part] for part in (calibration, validation)]
        real = [by_sample[id(s)] for s in samples if s.kind == "real"]
        result = search_steps(
            key,
            *map(stack_spectra, spectra),
            request,
            quiet,
            stop_early=False,
            real=stack_spectra(real) if real else None,
        )
    held = independent_samples(key, args.held)
    held_spectra = stack_spectra([normalized_spectrum(s.matrix, clip_quantile=CLIP) for s in held])
    return result.steps_search, held_spectra


def shape_rows(
    key, search: dict, held: torch.Tensor, target: float, rectangular: bool
) -> tuple[list[str], list[str], dict]:
    """The summary row and the frontier rows of one shape; and the three checks."""
    pe = load_table("polar-express").default_schedule
    muon = load_table("muon").default_schedule
    you = load_table("you-6step").default_schedule
    pe_by_k = {k: mean_error(held, pe.with_steps(k)) for k in range(1, MAX_AUTO_STEPS + 1)}
    ours = {
        p["steps"]: mean_error(held, Schedule(rows=tuple(map(tuple, p["coefficients"])), steps=p["steps"]))
        for p in search["frontier"]
    }
    chosen = search["chosen_steps"]
    shipped = chosen or min(search["frontier"], key=lambda p: p["validation_error"])["steps"]
    error = ours[shipped]
    reaches = error <= target
    any_k = steps_to_reach(ours, target)
    pe_same = steps_to_reach(pe_by_k, error)
    pe_target = steps_to_reach(pe_by_k, target)
    checks = {
        "reaches or out of reach": reaches or any_k is None,
        "no more steps than PE at equal error": pe_same is None or shipped <= pe_same,
        "≥ 2 fewer than PE (MLP)": (pe_same is None or pe_same - shipped >= 2) if rectangular else None,
    }
    shape = format_shape(key)
    summary = (
        f"| {shape} | {chosen if chosen else f'none ≤ {MAX_AUTO_STEPS} (ships {shipped})'} | {error:.4f} | "
        f"{'yes' if reaches else 'no'} | {any_k or f'none ≤ {MAX_AUTO_STEPS}'} | "
        f"{pe_target or f'> {MAX_AUTO_STEPS}'} | {pe_same or f'> {MAX_AUTO_STEPS}'} | "
        f"{mean_error(held, muon):.4f} / {mean_error(held, you):.4f} | "
        + " | ".join(_check(v) for v in checks.values())
        + " |"
    )
    frontier = [
        f"| {shape} | {p['steps']} | {ns_matmul_flops(key, p['steps']) / 1e9:.3f} | "
        f"{p['validation_error']:.4f} | {_error(p.get('real_momentum_error'))} | {p['shipped']} | "
        f"{'yes' if p['reaches_target'] else 'no'} | "
        f"{ours[p['steps']]:.4f} | {pe_by_k[p['steps']]:.4f} | {p['fit_seconds']:.1f} |"
        for p in search["frontier"]
    ]
    return [summary], frontier, checks


def mlp_shapes(args, keys) -> set:
    if args.arch:
        return {
            layer.key for layer in resolve_shapes(None, args.arch, None)[1] if layer.name.startswith("mlp.")
        }
    return {key for key in keys if max(key) >= MLP_ASPECT * min(key)}


def _error(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _check(value: bool | None) -> str:
    return "—" if value is None else ("met" if value else "**missed**")


def fewest_steps_report(keys, args) -> str:
    target = parse_target(args.target)
    if target.value is None:
        raise SystemExit("auto_steps.py: --target must be a number here (the held-out check compares errors)")
    summary = [
        "| shape | chosen k (calibration) | held-out error at k | reaches target "
        "| fewest k of ours reaching it (held-out) | PE steps to reach target | PE steps for the same error "
        "| Muon 5 / You 6 | reaches or out of reach | ≤ PE at equal error | ≥ 2 fewer than PE (MLP) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    frontier = [
        "| shape | k | GFLOPs per call | validation error (calibration) | real momentum error (calibration) "
        "| shipped | reaches target (validation + real + stress) | held-out error, ours "
        "| held-out error, Polar Express at k | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        started = time.perf_counter()
        search, held = frontier_for(key, args)
        rows, points, _ = shape_rows(key, search, held, target.value, key in mlp_shapes(args, keys))
        summary += rows
        frontier += points
        print(f"{format_shape(key)}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    header = [
        f"#### auto_steps — {dt.date.today()} — {machine()} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/auto_steps.py {shlex.join(sys.argv[1:])}`. The search of "
        f"`root-calibrate --steps auto --target {args.target}` (calibration harvest seed 0, stdlib, 1:3 mix, "
        f"{auto_iterations(args.iterations)} generations per k), continued to {MAX_AUTO_STEPS} steps; "
        f"scored on {args.independent_count} independent held-out matrices per shape (precision.py's set "
        f"{args.independent_set}). "
        "Polar Express beyond 5 steps repeats its last row. Errors: mean float64 spectral error.",
        "",
    ]
    return "\n".join([*header, *summary, "", *frontier]) + "\n"


# ---- timing --------------------------------------------------------------------------------------


def timed_run(cli_args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "calibrate", *cli_args, "--out", out, "--quiet"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - started


def timing_report(args) -> str:
    base = (["--arch", args.arch] if args.arch else ["--shapes", args.shapes]) + ["--cache", str(args.cache)]
    base += ["--iterations", str(args.iterations)]
    runs = {
        "fixed (--steps 5)": base,
        f"auto (--steps auto --target {args.target})": [*base, "--steps", "auto", "--target", args.target],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.timing):
        for name, cli in runs.items():  # alternating, so both see the same machine load
            times[name].append(timed_run(cli))
            print(f"{name} #{repeat + 1}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    fixed, auto = (statistics.median(t) for t in times.values())
    lines = [
        f"#### auto_steps timing — {dt.date.today()} — {machine()} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/auto_steps.py {shlex.join(sys.argv[1:])}`: the CLI "
        f"(`root-calibrate {shlex.join(base)} [--steps auto --target {args.target}] --out TMP --quiet`), "
        f"{args.timing} run(s) each, alternating, harvests and spectra from the cache.",
        "",
        "| run | wall times (s) | median (s) |",
        "|---|---|---|",
        *(
            f"| {name} | {', '.join(f'{t:.1f}' for t in values)} | {statistics.median(values):.1f} |"
            for name, values in times.items()
        ),
        "",
        f"auto / fixed (medians): **{auto / fixed:.2f}×**",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", help="shapes of an architecture preset (e.g. qwen2.5-0.5b)")
    parser.add_argument("--shapes", help="comma-separated MxN shapes")
    parser.add_argument("--target", default="0.1")
    parser.add_argument("--samples", type=int, default=16, help="as root-calibrate --samples")
    parser.add_argument("--iterations", type=int, default=200, help="as root-calibrate --iterations")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="calibration cache")
    parser.add_argument(
        "--held-out-cache", type=Path, default=default_cache_dir(), help="precision.py's cache"
    )
    parser.add_argument("--independent-count", type=int, default=INDEPENDENT_COUNT)
    parser.add_argument(
        "--independent-set", type=int, choices=(1, 2), default=1, help="precision.py's independent set"
    )
    parser.add_argument("--steps", type=int, default=None, help="held-out harvest training steps")
    parser.add_argument("--harvest-steps", type=int, default=None, help="calibration harvest training steps")
    parser.add_argument("--timing", type=int, default=0, help="time N fixed and N auto CLI runs instead")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if bool(args.arch) == bool(args.shapes):
        parser.error("give exactly one of --arch and --shapes")
    args.corpus = held_out_corpus()
    return args


def main() -> None:
    args = parse_args()
    if args.timing:
        publish(timing_report(args), args.record)
        return
    keys = resolve_shapes(None, args.arch, None)[0] if args.arch else parse_shapes(args.shapes)
    # independent_samples reads its harvest cache from .cache, as precision.py does.
    args.held = argparse.Namespace(**{**vars(args), "cache": args.held_out_cache})
    publish(fewest_steps_report(keys, args), args.record)


if __name__ == "__main__":
    main()
