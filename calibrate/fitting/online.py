"""Online recalibration: the fit behind ``ROOT(recalibrate=OnlineRecalibrator(), recalibrate_every=K)``.

ROOT (``root_core.recalibration``) decides *when*: it pools the spectra its recorder took, submits a
:class:`~root_core.recalibration.RecalibrationRequest` every K steps and applies the answer exactly ``lag``
steps later. This module decides *what*, with the CLI's own pieces (docs/design.md §7):

1. per shape, the recorded spectra are split: every 4th in recording order is held out (so each phase of
   the run is in both parts), the rest are fitted with ``calibrate.fitting.fit.fit`` (the same bound and
   robust criterion as ``root-calibrate``; the table's current rows are one more start point);
2. on the held-out spectra, fitted rows that lose to the baseline fall back to its rows
   (``pipeline.baseline_check`` and ``pipeline.baseline_rows``, as the CLI does);
3. the candidate replaces the current rows only if it beats them on the held-out spectra by at least
   ``min_improvement`` and is no worse on all recorded spectra, and stays within the bound;
4. if any shape changed, the next version of the online table is written once, atomically, never over
   another file (``save_table``), and returned; otherwise the answer is "keep".

The work runs in a worker process (``spawn``): the fit pins torch to one thread for bit-identical rows
(``calibrate.determinism``), and ``torch.set_num_threads`` is process-wide, so in a thread of the training
process it would change the training's thread count too. ``processes=0`` runs the fit inline instead
(on the caller's thread, which then waits for it), for tests and debugging.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import platform
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import calibrate
from root_core.recalibration import RecalibrationRequest, RecalibrationResult
from root_core.schedule import Schedule
from root_core.tables import CoefficientTable, TableError, load_table, save_table, user_tables_dir, utc_now

from ..determinism import deterministic
from ..errors import CalibrationError
from ..shapes import format_shape
from .fit import FitResult, FitSettings, fit, fold_scale
from .objective import safety, sample_errors
from .pipeline import CalibrationRequest, baseline_check, baseline_rows

# One in HELD_OUT_EVERY recorded spectra of a shape is held out to decide the swap (25%, the CLI's
# default validation fraction).
HELD_OUT_EVERY = 4
# Fewer than this and there is nothing to hold out: the shape keeps its rows.
MIN_SPECTRA = 2
# A swap writes a new table version and changes the training's rows; below a 1% gain on held-out
# spectra that is churn, not progress. A choice, not a measurement: min_improvement= changes it.
DEFAULT_MIN_IMPROVEMENT = 0.01
# Search generations per fit. At 50 a shape with 48 fitted spectra of r = 64 takes ~10 s on one CPU
# thread (benchmarks/RESULTS.md, "Online recalibration"); the CLI's 200 are for an offline hour.
DEFAULT_ITERATIONS = 50
# The worker yields the CPU to training: on a machine with few cores the fit runs in the gaps.
DEFAULT_NICE = 10
ONLINE_SUFFIX = "-online"


@dataclass(frozen=True)
class OnlineSettings:
    """What every fit of one :class:`OnlineRecalibrator` shares (picklable: it travels to the worker)."""

    out: Path
    name: str | None = None  # None: "<table>-online"
    fit: FitSettings = field(default_factory=lambda: FitSettings(iterations=DEFAULT_ITERATIONS))
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT


class OnlineRecalibrator:
    """The fit ROOT's ``recalibrate=`` takes: ``submit(request)`` returns a ``concurrent.futures.Future``.

    Args:
        out: folder the new table versions are written to (``<out>/<name>/v<N>.json``); default the user
            table folder, so a run's online table loads by name afterwards.
        name: the online table's name; default ``<table>-online`` (``muon`` → ``muon-online``).
        fit: ``FitSettings`` (steps, form, max gain, criterion, seed, iterations); default the CLI's
            except ``iterations=50``.
        min_improvement: relative gain on held-out spectra a swap needs (default 0.01).
        processes: ``1`` (default) fits in one spawned worker process; ``0`` inline on the calling thread.
        nice: niceness added to the worker process (default 10).

    The worker is started at construction (its imports overlap the first steps). Call :meth:`close` (or
    use it as a context manager) when training ends. A training script needs no ``__main__`` guard: the
    worker never imports the script (``_MainHiddenExecutor``).
    """

    def __init__(
        self,
        *,
        out: str | os.PathLike | None = None,
        name: str | None = None,
        fit: FitSettings | None = None,
        min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
        processes: int = 1,
        nice: int = DEFAULT_NICE,
    ) -> None:
        if processes not in (0, 1):
            raise CalibrationError(
                f"processes must be 0 (inline) or 1 (one worker process), got {processes!r}"
            )
        if not (isinstance(min_improvement, (int, float)) and 0.0 <= min_improvement < 1.0):
            raise CalibrationError(f"min_improvement must be a number in [0, 1), got {min_improvement!r}")
        if name is not None:
            _check_name(name)
        folder = Path(out).expanduser() if out is not None else user_tables_dir()
        _check_writable(folder)
        self.settings = OnlineSettings(
            out=folder,
            name=name,
            fit=fit if fit is not None else FitSettings(iterations=DEFAULT_ITERATIONS),
            min_improvement=float(min_improvement),
        )
        self.processes = processes
        self.nice = nice
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        if processes:
            # Started now, so its imports (~5 s on a loaded 2-core machine) overlap the first K steps.
            self._worker().submit(_ready)

    def submit(self, request: RecalibrationRequest) -> concurrent.futures.Future:
        # Pickled here with plain pickle, so tensors travel as bytes rather than as shared-memory handles
        # (torch's multiprocessing reductions would move the training process's pool into shared memory).
        payload = pickle.dumps(request)
        if self.processes == 0:
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(run_payload(payload, self.settings))
            except Exception as error:  # raised where ROOT waits, as from a worker
                future.set_exception(error)
            return future
        return self._worker().submit(run_payload, payload, self.settings)

    def _worker(self) -> _MainHiddenExecutor:
        if self._executor is None:
            self._executor = _MainHiddenExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.nice,),
            )
        return self._executor

    def close(self) -> None:
        """Stop the worker; a fit in flight is abandoned (a table file is written whole or not at all).

        Training that ends right after a launch would otherwise wait seconds for a fit nobody applies.
        """
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        terminate = getattr(executor, "terminate_workers", None)  # Python 3.14+
        if terminate is not None:
            terminate()
        else:
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OnlineRecalibrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MainHiddenExecutor(concurrent.futures.ProcessPoolExecutor):
    """A spawned worker re-imports the parent's ``__main__`` module (to unpickle functions defined there),
    so a training script without an ``if __name__ == "__main__":`` guard would train again in the worker,
    into the same record folder. The worker runs only this module's functions, so the process is started
    (in ``submit``, on the calling thread) while ``sys.modules["__main__"]`` is an empty stand-in: spawn
    then has no main module to import."""

    def submit(self, fn, /, *args, **kwargs):
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return super().submit(fn, *args, **kwargs)
        finally:
            if main is not None:
                sys.modules["__main__"] = main


def _ready() -> None:
    """The warm-up task: the worker has started and imported this module."""


def _start_worker(nice: int) -> None:
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    torch.set_num_threads(1)


def run_payload(payload: bytes, settings: OnlineSettings) -> RecalibrationResult:
    return recalibrate(pickle.loads(payload), settings)


@deterministic  # one thread: the same request gives bit-identical rows (calibrate/determinism.py)
def recalibrate(request: RecalibrationRequest, settings: OnlineSettings) -> RecalibrationResult:
    """Refit every shape of ``request`` and return the next online table, or "keep" (see the module doc)."""
    started = time.perf_counter()
    table = CoefficientTable.from_dict(request.table)
    report: dict[str, Any] = {}
    changed: dict[tuple[int, int], dict[str, Any]] = {}
    for shape in sorted(request.spectra):
        decision = refit_shape(shape, request, table, settings)
        report[format_shape(shape)] = {k: v for k, v in decision.items() if k != "entry"}
        if "entry" in decision:
            changed[shape] = decision["entry"]
    if not changed:
        return RecalibrationResult(table=None, report=report)
    new = next_table(table, changed, request, settings, seconds=time.perf_counter() - started)
    path, written = write_table(new, settings.out)
    return RecalibrationResult(table=written.to_dict(), path=str(path), report=report)


def held_out_split(count: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: every HELD_OUT_EVERY-th in recording order is held out, at least one."""
    held = [i for i in range(count) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1] or [count - 1]
    return [i for i in range(count) if i not in held], held


def refit_shape(
    shape: tuple[int, int], request: RecalibrationRequest, table: CoefficientTable, settings: OnlineSettings
) -> dict[str, Any]:
    """One shape's decision: ``{"decision": "swap" | "keep", "reason", errors..., "entry": ...}``."""
    spectra = request.spectra[shape].to(torch.float64)
    count = spectra.shape[0]
    if count < MIN_SPECTRA:
        return {"decision": "keep", "reason": f"{count} recorded spectrum; a refit needs {MIN_SPECTRA}"}
    fit_rows, held_rows = held_out_split(count)
    fitted_on, held_out = spectra[fit_rows], spectra[held_rows]
    with warnings.catch_warnings():  # a shape the table lacks: its default rows, as ROOT runs them
        warnings.simplefilter("ignore")
        current = table.schedule_for(shape, missing=request.missing_shape)
    steps = settings.fit.steps
    try:
        fitted = fit(
            fitted_on, settings.fit, label=format_shape(shape), extra_starts=_start(current, settings)
        )
    except CalibrationError as error:
        return {"decision": "keep", "reason": f"fit failed: {error}"}
    candidate, fallback = _after_baseline_check(shape, fitted, held_out, settings)
    shipped = Schedule(
        rows=unfold_scale(candidate.rows, table.normalization.scale),
        scale=table.normalization.scale,
        steps=steps,
    )
    errors = {
        "current": _mean(held_out, current),
        "fitted": _mean(held_out, fitted.schedule),
        "candidate": _mean(held_out, shipped),
        "current_all": _mean(spectra, current),
        "candidate_all": _mean(spectra, shipped),
    }
    record: dict[str, Any] = {
        "samples": {"fitted": len(fit_rows), "held_out": len(held_rows)},
        "errors": errors,  # mean spectral error: held-out, and "_all": every recorded spectrum
        "fallback": fallback["to"] if fallback else None,
        "fit_seconds": round(fitted.seconds, 3),
    }
    bound = safety(shipped, settings.fit.max_gain)
    needed = errors["current"] * (1.0 - settings.min_improvement)
    if not bound.ok:
        reason = f"candidate rows reach {bound.high:.4g} > max gain {settings.fit.max_gain}"
    elif not errors["candidate"] < needed:
        reason = (
            f"held-out error {errors['candidate']:.5f} is not {settings.min_improvement:.0%} below the "
            f"current rows' {errors['current']:.5f}"
        )
    elif errors["candidate_all"] > errors["current_all"]:
        reason = (
            f"worse on all recorded spectra ({errors['candidate_all']:.5f} > {errors['current_all']:.5f})"
        )
    else:
        source = (
            f"{fallback['to']}'s rows (fitted rows lost: {fallback['reason']})" if fallback else "fitted rows"
        )
        entry = _entry(table, shape, shipped, fitted, fallback, record, request, bound.high)
        return {"decision": "swap", "reason": source, **record, "entry": entry}
    return {"decision": "keep", "reason": reason, **record}


def _start(current: Schedule, settings: OnlineSettings) -> dict[str, Schedule]:
    """The current rows as a start point of the search, in its scale-1 form (as fit.start_schedules)."""
    steps = settings.fit.steps
    rows = fold_scale(current.expanded(steps), current.scale)
    if settings.fit.shared:
        return {"current": Schedule(rows=rows[:1], steps=steps)} if len(set(rows)) == 1 else {}
    return {"current": Schedule(rows=rows, steps=steps)}


def _after_baseline_check(
    shape: tuple[int, int], fitted: FitResult, held_out: Tensor, settings: OnlineSettings
) -> tuple[Schedule, dict | None]:
    """The CLI's fallback on the held-out spectra: the baseline's rows where the fitted ones lose."""
    name = settings.fit.stress_baseline
    baseline = baseline_rows(name, settings.fit.steps)
    spectral = {
        "calibrated": sample_errors(held_out, fitted.schedule).tolist(),
        name: sample_errors(held_out, baseline).tolist(),
    }
    cli_request = CalibrationRequest(shapes=[shape], out=settings.out, name="online", fit=settings.fit)
    fallback = baseline_check(fitted, spectral, {}, cli_request)
    return (baseline, fallback) if fallback is not None else (fitted.schedule, None)


def unfold_scale(rows, scale: float) -> tuple:
    """The inverse of ``fit.fold_scale``: rows for an input divided by ``scale`` (the table's normalisation)
    that compute what ``rows`` compute on the unscaled input (docs/design.md §1.3)."""
    if scale == 1.0:
        return tuple(rows)
    (a, b, c), *rest = rows
    return ((a * scale, b * scale**3, c * scale**5), *rest)


def _entry(
    table, shape, shipped: Schedule, fitted: FitResult, fallback, record, request, bound: float
) -> dict:
    old = table.entry(shape)
    entry: dict[str, Any] = {
        "shape": list(shape),
        "coefficients": [list(row) for row in shipped.rows],
        "steps": shipped.steps,
    }
    if old is not None and old.form is not None:
        entry["form"] = old.form  # the NS form is the shape's, not the rows'
    entry["metrics"] = {
        "online": {"step": request.step, **record, "bound": bound, "max_gain": fitted.safety.max_gain},
        "robust": fitted.robust,
        **({"fallback": fallback} if fallback else {}),
    }
    return entry


def next_table(
    table: CoefficientTable,
    changed: dict[tuple[int, int], dict[str, Any]],
    request: RecalibrationRequest,
    settings: OnlineSettings,
    *,
    seconds: float,
) -> CoefficientTable:
    """The current table with the changed shapes' entries replaced, as the next online version."""
    name = settings.name or online_name(table.name)
    raw = table.to_dict()
    entries = {tuple(e["shape"]): e for e in raw["entries"]}
    entries.update(changed)
    shapes = ", ".join(format_shape(s) for s in sorted(changed))
    raw.update(
        name=name,
        version=table.version + 1 if table.name == name else 1,
        entries=[entries[s] for s in sorted(entries)],
        description=(
            f"Online recalibration of {table.name}@{table.version} after step {request.step}: {shapes}"
        ),
        provenance={
            "tool": f"root-calibrate {calibrate.__version__} (online)",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread)",
            "parent": table.ref,
            "base": table.provenance.get("base", table.ref),
            "step": request.step,
            "clip_quantile": request.clip_quantiles[0] if len(request.clip_quantiles) == 1 else None,
            "clip_quantiles": list(request.clip_quantiles),
            "search": {**settings.fit.record(), "min_improvement": settings.min_improvement},
            "sources": {format_shape(s): list(request.sources[s]) for s in sorted(changed)},
            "seconds": round(seconds, 3),
        },
    )
    raw["created"] = utc_now()
    raw.pop("content_hash", None)
    return CoefficientTable.from_dict(raw)


def write_table(table: CoefficientTable, out: Path) -> tuple[Path, CoefficientTable]:
    """Save ``table`` as its version, or the next free one; a file already holding the same coefficients at
    that version (a resumed run redoing a fit) is reused instead of written twice."""
    target = out / table.name / f"v{table.version}.json"
    if target.is_file():
        try:
            existing = load_table(target)
        except TableError:
            existing = None
        if existing is not None and existing.coefficients_hash == table.coefficients_hash:
            return target, existing
    path = save_table(table, out, on_clash="next")
    return path, load_table(path)


def online_name(name: str) -> str:
    return name if name.endswith(ONLINE_SUFFIX) else f"{name}{ONLINE_SUFFIX}"


def _mean(spectra: Tensor, schedule: Schedule) -> float:
    return float(sample_errors(spectra, schedule).mean())


def _check_name(name: str) -> None:
    try:
        CoefficientTable.create(name=name, default_rows=(1.0, 0.0, 0.0))
    except TableError:
        raise CalibrationError(
            f"invalid online table name {name!r}: expected a lowercase slug such as 'mymodel-online'"
        ) from None


def _check_writable(folder: Path) -> None:
    """Fail at construction, not at the first swap hours into training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CalibrationError(f"cannot create the online table folder {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CalibrationError(f"the online table folder {folder} is not writable")


__all__ = ["OnlineRecalibrator", "OnlineSettings", "recalibrate"]
