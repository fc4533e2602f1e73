"""Online recalibration's cost to training: fit time per shape, worker start-up, training-thread stall.

A stack of MLP blocks (``--layers`` × up ``ffn×hidden``, down ``hidden×ffn``, a square ``hidden×hidden``)
learns a fixed random teacher with ROOT, recording every ``--record-every`` steps. Three arms, each run
``--repeats`` times in rotation (record, worker, inline, record, …) so drifts in machine load hit all:

* record: recording only, the baseline;
* worker: plus ``recalibrate=OnlineRecalibrator(processes=1)`` every ``--every`` steps, applied ``--lag``
  steps later: the fit runs in a spawned, niced worker process;
* inline: the same with ``processes=0``, the fit on the training thread: the stall the worker avoids.

Per arm: wall time, the median step time outside apply steps (the worker competes for the CPU there), the
time of the apply steps (where the training waits for a fit that is not done), and, for the worker arm,
each fit's time from submit to result against the fit's own time (the difference is the worker's start-up
on the first fit, pickling after). Both recalibrating arms must end with the same rows (the fit is
deterministic); the report says whether they did.

    .venv/bin/python benchmarks/online_recalibration.py                 # ~2-4 minutes on 2 cores
    .venv/bin/python benchmarks/online_recalibration.py --record        # append to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import publish
from timing import load_average
from torch import nn

from calibrate.fitting.fit import FitSettings
from calibrate.fitting.online import OnlineRecalibrator
from root_core import ROOT

ARMS = ("record", "worker", "inline")


class TimedRecalibrator(OnlineRecalibrator):
    """Records each fit's time from submit until its result is ready."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latencies: list[float] = []

    def submit(self, request):
        started = time.perf_counter()
        future = super().submit(request)
        future.add_done_callback(
            lambda done: done.cancelled() or self.latencies.append(time.perf_counter() - started)
        )
        return future


def make_model(args) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(args.layers):
        blocks += [nn.Linear(args.hidden, args.ffn), nn.GELU(), nn.Linear(args.ffn, args.hidden)]
        blocks += [nn.Linear(args.hidden, args.hidden, bias=False), nn.Tanh()]
    return nn.Sequential(*blocks)


def run_arm(arm: str, args, folder: Path) -> dict:
    model, teacher = make_model(args), nn.Linear(args.hidden, args.hidden)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    recalibrator = None
    extra = {}
    if arm != "record":
        recalibrator = TimedRecalibrator(
            out=folder / "tables",
            fit=FitSettings(iterations=args.iterations),
            processes=1 if arm == "worker" else 0,
        )
        extra = dict(recalibrate=recalibrator, recalibrate_every=args.every, recalibrate_lag=args.lag)
    optimizer = ROOT(
        [{"params": matrices}, {"params": vectors, "use_root": False, "lr": 1e-3}],
        lr=0.02,
        record_dir=folder / "records",
        record_every=args.record_every,
        **extra,
    )
    generator = torch.Generator().manual_seed(1)
    times = []
    started = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.hidden, generator=generator)
        with torch.no_grad():
            target = torch.tanh(teacher(x))
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        begin = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    applied = {entry["applied"] for entry in optimizer.recalibrations}
    fits = [
        sum(shape.get("fit_seconds", 0.0) for shape in entry["report"].values())
        for entry in optimizer.recalibrations
    ]
    per_shape: dict[str, list[float]] = {}
    for entry in optimizer.recalibrations:
        for shape, decision in entry["report"].items():
            if "fit_seconds" in decision:
                per_shape.setdefault(f"{shape} ({decision['samples']['fitted']} spectra)", []).append(
                    decision["fit_seconds"]
                )
    if recalibrator is not None:
        recalibrator.close()
    return {
        "wall": wall,
        "loss": loss.item(),
        "other_steps": [t for step, t in enumerate(times, 1) if step not in applied],
        "apply_steps": [t for step, t in enumerate(times, 1) if step in applied],
        "fits": fits,
        "per_shape": per_shape,
        "latencies": list(recalibrator.latencies) if recalibrator else [],
        "swaps": sum(entry["swapped"] for entry in optimizer.recalibrations),
        "table": f"{optimizer.table.name}@{optimizer.table.version}",
        "rows": optimizer.table.coefficients_hash,
    }


def report(results: dict[str, list[dict]], args, load_before: str, load_after: str) -> str:
    shapes = f"{args.ffn}x{args.hidden} ×{2 * args.layers}, {args.hidden}x{args.hidden} ×{args.layers}"
    lines = [
        f"## Online recalibration: fit time and training-thread stall ({dt.date.today()})",
        "",
        f"`python benchmarks/online_recalibration.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} training threads; load average {load_before} before, {load_after} after",
        f"- model: MLP blocks with {shapes}; batch {args.batch}; {args.steps} steps; record every "
        f"{args.record_every}; refit every {args.every}, applied {args.lag} steps later; fit: "
        f"{args.iterations} generations, 1 thread; {args.repeats} rotations, medians over them",
        "",
        "| arm | wall s | median step ms (no apply) | vs record | apply steps ms (each) | fits s (each) "
        "| submit→result s (each) | swaps | final table |",
        "|---|---:|---:|---:|---|---|---|---:|---|",
    ]
    base = statistics.median(statistics.median(r["other_steps"]) for r in results["record"])
    for arm in ARMS:
        runs = results[arm]
        step = statistics.median(statistics.median(r["other_steps"]) for r in runs)
        first = runs[0]
        lines.append(
            f"| {arm} | {statistics.median(r['wall'] for r in runs):.1f} | {1e3 * step:.2f} | "
            f"{step / base:.2f} | {_each(first['apply_steps'], 1e3, 0)} | {_each(first['fits'], 1, 1)} | "
            f"{_each(first['latencies'], 1, 1)} | {first['swaps']} | {first['table']} |"
        )
    for shape, seconds in results["inline"][0]["per_shape"].items():
        lines.append(f"- inline fit of {shape}: {_each(seconds, 1, 1)} s")
    same = {r["rows"] for arm in ("worker", "inline") for r in results[arm]}
    lines += [
        "",
        f"Worker and inline arms end with {'the same rows' if len(same) == 1 else 'DIFFERENT rows'} in every "
        "rotation. Apply/fit/latency columns: the first rotation.",
    ]
    return "\n".join(lines) + "\n"


def _each(values: list[float], scale: float, digits: int) -> str:
    return ", ".join(f"{scale * v:.{digits}f}" for v in values) or "–"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lag", type=int, default=100)
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="training threads (default: torch's)")
    parser.add_argument("--record", action="store_true", help="append the report to RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else __import__("sys").argv[1:]) if a != "--record"]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for arm in ARMS:
                results[arm].append(run_arm(arm, args, Path(scratch) / f"{arm}{repeat}"))
                print(f"{arm} {repeat}: {results[arm][-1]['wall']:.1f} s", flush=True)
    publish(report(results, args, load_before, load_average()), args.record)


if __name__ == "__main__":
    main()
