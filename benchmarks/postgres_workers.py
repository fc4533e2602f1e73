"""One shape's optuna search shared by 1, 2 and 3 workers through a real PostgreSQL server, side by side.

The server is pgserver's (tests/postgres_server.py: a temp folder, a Unix socket, a password role). Each
round runs every worker count once, in rotating order, each on a new database, so every search starts
from nothing. A worker is a real `root-calibrate --backend optuna --storage postgresql://...` process;
N of them start together. Their spectra come from a cache filled before the first round, so what
differs between the counts is the search. Reported (medians over rounds): the wall time from the
workers' start to the last exit (process start-up, spectra from the cache, search, polish, matrix
check, table), and the search itself, from the study's records: first trial created (the start points)
to last trial finished, with the sampled trials' summed durations over that span (trials in flight on
average: about 1 when the workers' trials do not overlap), and the CPU seconds of the workers and of
the server (the postmaster and its finished backends) over the round. `--fit mean`: one search per
worker, the shared one (the robust criterion runs a local mean search first).

A second part measures what optuna's heartbeat would cost: one in-process search on PostgreSQL with the
storage opened without and with ``heartbeat_interval`` (a thread and a write per trial, and a query for
stale trials before each), alternating, medians.

    .venv/bin/python benchmarks/postgres_workers.py                  # 256x1024, 200 trials, 3 rounds
    .venv/bin/python benchmarks/postgres_workers.py --repeats 5 --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch
from results import publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import running_server  # the tests' server helper

WORKER_COUNTS = (1, 2, 3)
# A worker that takes longer than this has hung (one worker's default run here takes ~30 s).
WORKER_TIMEOUT_S = 900


def worker_command(args, storage: str, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "calibrate", "--shapes", args.shape, "--samples", str(args.samples),
        "--ratio", "0:1", "--iterations", str(args.iterations), "--backend", "optuna", "--fit", "mean",
        "--check-samples", "1", "--keep-fitted", "--quiet", "--storage", storage, "--out", str(out),
        "--cache", str(cache),
    ]  # fmt: skip


def run_workers(args, server, count: int, cache: Path, folder: Path) -> dict[str, float]:
    """``count`` workers on a new database: wall seconds, the study's search seconds, finished trials."""
    storage = server.new_database(f"w{count}")
    outs = [folder / f"{count}-{i}" for i in range(count)]
    postmaster = psutil.Process(server.handle.get_pid())
    cpu_before = (cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)), server_cpu(postmaster))
    started = time.perf_counter()
    processes = [
        subprocess.Popen(worker_command(args, storage, out, cache), stdout=subprocess.DEVNULL) for out in outs
    ]
    ends = []
    for process in processes:
        process.wait(timeout=WORKER_TIMEOUT_S)
        ends.append(time.perf_counter())
        if process.returncode:
            raise SystemExit(f"a worker failed with exit code {process.returncode}")
    workers_cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - cpu_before[0]
    return {
        "wall": max(ends) - started,
        "workers_cpu": workers_cpu,
        "server_cpu": server_cpu(postmaster) - cpu_before[1],
        **study_span(storage),
    }


def cpu_seconds(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def server_cpu(postmaster) -> float:
    """The server's CPU seconds so far: the postmaster and its ended children (a connection's backend
    ends with the connection, so a finished worker's queries are in)."""
    times = postmaster.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def study_span(storage: str) -> dict[str, float]:
    """The shared search's own time, from the study's records: first trial created to last finished."""
    import optuna
    from optuna.trial import TrialState

    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    first = min(t.datetime_start for t in complete)
    last = max(t.datetime_complete for t in complete)
    span = (last - first).total_seconds()
    # Trials in flight on average: the sampled trials' summed durations (ask → tell) over the span.
    sampled = [t for t in complete if "start" not in t.user_attrs]
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in sampled)
    return {"search": span, "in_flight": busy / span, "trials": float(len(complete))}


def heartbeat_cost(args, server, spectra) -> dict[str, list[float]]:
    """One in-process search, storage opened without and with a heartbeat, alternating; seconds each."""
    import optuna

    from calibrate.fitting import fit as fitting

    plain_open = fitting._open_storage
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in times:
            interval = 10 if mode == "on" else None

            def opened(url, interval=interval):
                storage = plain_open(url)
                if interval is None:
                    return storage
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, heartbeat_interval=interval)

            fitting._open_storage = opened
            storage = server.new_database("hb")
            settings = fitting.FitSettings(
                backend="optuna", iterations=args.iterations, storage=storage, criterion="mean"
            )
            started = time.perf_counter()
            fitting.fit(spectra, settings, label=args.shape)
            times[mode].append(time.perf_counter() - started)
    fitting._open_storage = plain_open
    return times


def calibration_spectra(args) -> torch.Tensor:
    from calibrate.sampling.synthetic import synthetic_samples
    from calibrate.spectra import normalized_spectrum

    m, n = (int(x) for x in args.shape.split("x"))
    samples = synthetic_samples((m, n), args.samples, seed=0)
    return torch.stack([normalized_spectrum(s.matrix, clip_quantile=0.9) for s in samples])


def report(rows, heartbeat, args, loads) -> str:
    today = dt.date.today().isoformat()
    one = statistics.median(r["search"] for r in rows[1])
    lines = [
        f"### postgres_workers — {today} — cpu ({platform.machine()}, {os.cpu_count()} cores) — "
        f"torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/postgres_workers.py --shape {args.shape} --samples {args.samples} "
        f"--iterations {args.iterations} --repeats {args.repeats}`; {args.iterations * 10} finished trials "
        f"per study (per-step rows, 5 steps, --fit mean), medians of {args.repeats} rounds. "
        f"/proc/loadavg (1 min) before and after: {loads[0]:.2f}, {loads[1]:.2f}.",
        "",
        "| workers | wall s (start → last exit) | search s (study: first → last trial) | speed-up "
        "| trials in flight | CPU s: workers | CPU s: server | trials |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for count in WORKER_COUNTS:
        wall, search, in_flight, workers, db, trials = (
            statistics.median(r[key] for r in rows[count])
            for key in ("wall", "search", "in_flight", "workers_cpu", "server_cpu", "trials")
        )
        lines.append(
            f"| {count} | {wall:.1f} | {search:.1f} | {one / search:.2f}× | {in_flight:.2f} | {workers:.1f} "
            f"| {db:.1f} | {trials:.0f} |"
        )
    off, on = (statistics.median(heartbeat[m]) for m in ("off", "on"))
    lines += [
        "",
        f"Heartbeat cost, one in-process worker, same search: {off:.1f} s without, {on:.1f} s with "
        f"`heartbeat_interval=10` ({on / off:.2f}×).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="256x1024")
    parser.add_argument("--samples", type=int, default=8, help="synthetic samples per shape")
    parser.add_argument("--iterations", type=int, default=20, help="×10 finished trials per study")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    # A plain kill must still stop the server and delete its folder (the context managers below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="postgres-workers-") as tmp, running_server() as server:
        folder, cache = Path(tmp), Path(tmp) / "cache"
        run_workers(args, server, 1, cache, folder / "warm")  # fills the spectrum cache
        rows: dict[int, list[dict[str, float]]] = {count: [] for count in WORKER_COUNTS}
        for round_ in range(args.repeats):
            order = WORKER_COUNTS[round_ % 3 :] + WORKER_COUNTS[: round_ % 3]
            for count in order:
                rows[count].append(run_workers(args, server, count, cache, folder / f"r{round_}"))
                print(f"round {round_}: {count} worker(s): {rows[count][-1]}", file=sys.stderr, flush=True)
        heartbeat = heartbeat_cost(args, server, calibration_spectra(args))
    publish(report(rows, heartbeat, args, (before, os.getloadavg()[0])), args.record)


if __name__ == "__main__":
    main()
