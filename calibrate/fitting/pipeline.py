"""The calibration run, stage by stage: samples → clip → spectra → fit → matrix check → table.

Plain functions with the CLI as a thin layer on top (``calibrate/cli/``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

import calibrate
from root_core.schedule import Schedule
from root_core.tables import BASELINE_TABLES, CoefficientTable, load_table, next_version, save_table

from ..determinism import deterministic, pinned_threads
from ..errors import CalibrationError
from ..evaluate import matrix_errors
from ..progress import Stages
from ..sampling import Sample
from ..sampling.harvest import cached_harvest, harvest_run_steps, resolve_steps
from ..sampling.mix import reject_non_finite, split_counts, train_validation_split
from ..sampling.probes import parse_probes
from ..sampling.real import load_real_samples
from ..sampling.recorded import check_recorded_clip, check_recorded_shapes, recorded_step
from ..sampling.synthetic import family_cycle, synthetic_samples
from ..shapes import LayerShape, format_shape
from ..spectra import SpectrumCache
from .fit import STRESS_BASELINES, FitResult, FitSettings, check_storage, fit, fold_scale, guarded_fit
from .objective import (
    Safety,
    mean_error,
    safety,
    sample_errors,
    stack_spectra,
    stress_sets,
    stress_spectra,
    tail_statistics,
)
from .steps import (
    MAX_AUTO_STEPS,
    MIN_AUTO_STEPS,
    TARGET_SETS,
    FrontierPoint,
    Target,
    auto_iterations,
    choose_steps,
    frontier_record,
    ns_matmul_flops,
    target_levels,
)

ShapeKey = tuple[int, int]
# The default rows of a calibrated table, for shapes it does not list: Muon's triple, the ROOT
# reference's own fallback (docs/design.md §2).
DEFAULT_ROWS = load_table("muon").default_schedule.rows
# The validation label of fitted rows that lost to the baseline and were replaced by its rows (issue 10).
FITTED_LABEL = "fitted (not shipped)"


@dataclass(kw_only=True)
class CalibrationRequest:
    shapes: list[ShapeKey]
    out: Path
    name: str
    layer_shapes: list[LayerShape] | None = None
    ratio: tuple[int, int] = (1, 3)
    samples: int = 16
    seed: int = 0
    real: list[Path] = field(default_factory=list)
    real_is_momentum: bool = False  # --real-is-momentum: unmarked plain tensors count as momentum
    corpus: Path | None = None
    harvest_steps: int | None = None
    probes: tuple[str, ...] | None = None  # the harvester's probe mix; None = its DEFAULT_PROBES
    clip_quantile: float | None = 0.9
    families: tuple[str, ...] | None = None  # synthetic family cycle; None = DEFAULT_MIX
    fit: FitSettings = field(default_factory=FitSettings)
    device: str = "cpu"
    cache_dir: Path | None = None
    validation_fraction: float = 0.25
    check_samples: int = 2
    command: str = ""
    ranks: int = 1  # torchrun processes sharing the work (calibrate/fitting/ranks.py)
    keep_fitted: bool = False  # --keep-fitted: ship fitted rows even where they lose to the baseline
    # --steps auto: the target each shape's step count must reach (calibrate/fitting/steps.py);
    # None: fit.steps
    target: Target | None = None


@dataclass
class ShapeResult:
    key: ShapeKey
    fit: FitResult
    validation: dict[str, list[float]]  # label → spectral error per validation sample
    matrix: dict[str, dict[str, list[float]]]  # label → dtype → matrix error per checked sample
    sources: list[str]
    counts: dict[str, int]
    seconds: dict[str, float]
    # The rows the table ships: the fitted ones, or the baseline's where they lost (``fallback``).
    shipped: Schedule | None = None
    calibration_error: float | None = None  # of the shipped rows
    # Where the fitted rows lost to the baseline on validation: why, and both errors (``baseline_check``).
    fallback: dict | None = None
    tails: dict = field(default_factory=dict)  # the calibration and stress spectra's deepest tails

    @property
    def schedule(self) -> Schedule:
        return self.shipped or self.fit.schedule

    @property
    def safety(self) -> Safety:
        if self.shipped is None:
            return self.fit.safety
        return safety(self.shipped, self.fit.safety.max_gain, self.fit.safety.margin)

    def bound_for(self, label: str) -> float | None:
        """The max of P (under the rounding margin) of the shipped or the fitted rows, for the summary."""
        if label == "calibrated":
            return self.safety.high
        return self.fit.safety.high if label == FITTED_LABEL else None

    @property
    def note(self) -> str:
        """One line for the summary where the fitted rows lost to the baseline; "" otherwise."""
        picked = self.fit.candidates
        if picked and picked["chosen"] == "guarded" and self.fallback is None:
            return (
                f"{format_shape(self.key)}: the guarded fit ({picked['guard']}) has the lower validation "
                f"error, {picked['guarded']['validation_error']:.4f} against the robust fit's "
                f"{picked['robust']['validation_error']:.4f}; the table uses it"
            )
        if self.fallback is None:
            return ""
        shape, to = format_shape(self.key), self.fallback["to"]
        if "steps" in self.fallback:  # compared at the fitted count, not the baseline's own
            to = f"{to} at {self.fallback['steps']} steps"
        if self.fallback.get("kept"):
            return f"{shape}: fitted rows lose to {to} ({self.fallback['reason']}); kept (--keep-fitted)"
        tried = ""
        if picked:
            tried = (
                f"; robust fit {picked['robust']['validation_error']:.4f}, guarded fit "
                f"{picked['guarded']['validation_error']:.4f}"
            )
        return (
            f"{shape}: fitted rows lose to {to} ({self.fallback['reason']}{tried}); the table uses {to}'s "
            "rows (--keep-fitted keeps the fitted ones)"
        )

    @property
    def steps_note(self) -> str:
        """--steps auto: one line per shape with the chosen count, or that no k reached the target."""
        search = self.fit.steps_search
        if not search:
            return ""
        shape, steps = format_shape(self.key), self.schedule.num_steps
        if search["reached"]:
            return f"{shape}: {steps} steps reach the target ({search['target_meaning']})"
        return (
            f"{shape}: no safe rows reach the target ({search['target_meaning']}) within "
            f"{search['searched_steps'][-1]} steps; the table uses the {steps}-step rows, the lowest "
            "validation error on the frontier (root-calibrate show)"
        )

    def metrics(self) -> dict:
        bound = self.safety
        kept = self.fallback is not None and self.fallback.get("kept")
        steps = self.schedule.num_steps
        return {
            "steps": steps,
            "flops_per_call": ns_matmul_flops(self.key, steps),  # calibrate.fitting.steps.ns_matmul_flops
            "calibration_error": (
                self.fit.calibration_error if self.calibration_error is None else self.calibration_error
            ),
            "validation_error": _mean(self.validation["calibrated"]),
            "validation_p95": _p95(self.validation["calibrated"]),
            **{f"matrix_error_{dtype}": _mean(v) for dtype, v in self.matrix["calibrated"].items()},
            "bound": bound.high,
            "bound_low": bound.low,
            "max_gain": bound.max_gain,
            # "bound" holds with σ and every step's output up to this much (relative) too large.
            "bound_margin": bound.margin,
            "baselines": {
                label: {
                    "validation_error": _mean(self.validation[label]),
                    **{f"matrix_error_{d}": _mean(v) for d, v in self.matrix.get(label, {}).items()},
                }
                for label in self.validation
                if label not in ("calibrated", FITTED_LABEL)
            },
            # The fitted rows' stress sets next to the baseline's, and the price of the guarantee.
            "robust": self.fit.robust,
            "tails": self.tails,
            **({"loses_to_baseline" if kept else "fallback": self.fallback} if self.fallback else {}),
            **({"candidates": self.fit.candidates} if self.fit.candidates else {}),
            **({"steps_search": self.fit.steps_search} if self.fit.steps_search else {}),
            "samples": self.counts,
            "seconds": {stage: round(s, 3) for stage, s in self.seconds.items()},
        }


@dataclass
class SamplePlan:
    """Where a shape's samples come from, in sample order: files, then a harvest, then synthetic.

    Sample ``i`` of a shape is the same matrix however the work is split (``calibrate/fitting/ranks.py``).
    """

    key: ShapeKey
    files: list[Sample]
    harvest: int
    synthetic: int

    @property
    def real(self) -> int:
        return len(self.files) + self.harvest


def plan_samples(key: ShapeKey, request: CalibrationRequest, files: list[Sample]) -> SamplePlan:
    """The requested real:synthetic counts; real ones from files first, the rest harvested."""
    n_real, n_synthetic = split_counts(request.samples, request.ratio)
    real = _spread(files, n_real)
    return SamplePlan(key=key, files=real, harvest=n_real - len(real), synthetic=n_synthetic)


def collect_samples(
    key: ShapeKey, request: CalibrationRequest, stages: Stages, files: list[Sample]
) -> list[Sample]:
    """The shape's samples at the requested real:synthetic ratio; real ones from files, else harvested."""
    plan = plan_samples(key, request, files)
    real = list(plan.files)
    if plan.harvest > 0:
        real += harvest_stage(plan, request, stages)
    with stages.stage(f"{format_shape(key)} synthetic samples", plan.synthetic) as advance:
        synthetic = synthetic_samples(key, plan.synthetic, seed=request.seed, families=request.families)
        advance(plan.synthetic)
    samples = real + synthetic
    reject_non_finite(samples)
    return samples


def harvest_stage(plan: SamplePlan, request: CalibrationRequest, stages: Stages) -> list[Sample]:
    steps = resolve_steps(
        plan.key, plan.harvest, request.harvest_steps, device=request.device, probes=request.probes
    )
    total = harvest_run_steps(plan.key, plan.harvest, steps, request.probes)
    with stages.stage(f"{format_shape(plan.key)} harvest ({total} training steps)", total) as advance:
        return harvested(plan.key, plan.harvest, steps, request, advance)


def harvested(key: ShapeKey, count: int, steps: int, request: CalibrationRequest, advance) -> list[Sample]:
    """The harvester's samples, from ``cache_dir/harvest`` when the same harvest ran before, so a re-fit
    with another --schedule or search setting skips the training run."""
    return cached_harvest(
        key,
        count,
        seed=request.seed,
        corpus=request.corpus,
        steps=steps,
        device=request.device,
        folder=request.cache_dir / "harvest" if request.cache_dir is not None else None,
        probes=request.probes,
        progress=advance,
    )


def calibrate_shape(
    key: ShapeKey, request: CalibrationRequest, stages: Stages, files: list[Sample], cache: SpectrumCache
) -> ShapeResult:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    samples = collect_samples(key, request, stages, files)
    seconds["samples"] = time.perf_counter() - started
    calibration, validation = train_validation_split(samples, request.validation_fraction, seed=request.seed)

    # The fits need the calibration spectra only, so they run on a second thread while the validation
    # spectra are computed: every stage here runs on one torch thread (calibrate/determinism.py), so a
    # 2-core machine has a core to spare. One pin around both keeps the process at one thread throughout
    # (torch's thread count is per process; the stages' own pins then restore one, not the caller's).
    started = time.perf_counter()
    with pinned_threads(), ThreadPoolExecutor(max_workers=1) as pool:
        with stages.stage(
            f"{format_shape(key)} spectra (clip q={request.clip_quantile})", len(samples)
        ) as advance:
            spectra, candidates = {}, None
            last_fitted = calibration[-1] if calibration and request.target is None else None
            for sample in [*calibration, *validation]:
                spectra[id(sample)] = sample_spectrum(sample, request, cache)
                advance(1)
                if sample is last_fitted:
                    fitted_on = [spectra[id(s)] for s in calibration]
                    candidates = pool.submit(fit_candidates, key, fitted_on, request, bool(validation))
        seconds["spectra"] = time.perf_counter() - started

        started = time.perf_counter()  # the fits' own time is in the entry's method record
        fitted = fit_shape(
            key,
            [spectra[id(s)] for s in calibration],
            request,
            stages,
            [spectra[id(s)] for s in validation],
            real=[spectra[id(s)] for s in samples if s.kind == "real"],
            candidates=candidates,
        )
        seconds["fit"] = time.perf_counter() - started

    started = time.perf_counter()
    checked = matrix_checked(validation, request)
    with stages.stage(f"{format_shape(key)} matrix check vs SVD", len(checked)) as advance:
        matrix = check_matrices(key, [s.matrix for s in checked], fitted, request, advance)
    seconds["check"] = time.perf_counter() - started
    return shape_result(key, fitted, request, samples, spectra, matrix, seconds)


def sample_spectrum(sample: Sample, request: CalibrationRequest, cache: SpectrumCache) -> Tensor:
    if not sample.has_matrix:  # a recorded spectrum, taken at this clip quantile (check_recorded_clip)
        return sample.spectrum
    return cache.spectrum(sample.matrix, clip_quantile=request.clip_quantile, device=request.device)


@deterministic  # the search's reductions depend on the thread count (calibrate/determinism.py)
def fit_shape(
    key: ShapeKey,
    spectra: list[Tensor],
    request: CalibrationRequest,
    stages: Stages,
    validation: list[Tensor] | None = None,
    real: list[Tensor] | None = None,
    candidates: Future | None = None,
) -> FitResult:
    """The shape's rows from its calibration spectra; with --steps auto, also its validation spectra and
    the spectra of its real momentum samples (calibration and validation; an absolute target must hold
    on them too, calibrate/fitting/steps.py). ``candidates``: ``fit_candidates`` already running on the
    same calibration spectra (calibrate_shape starts it before the validation spectra)."""
    if request.target is not None:
        if not validation:
            raise CalibrationError("--steps auto needs validation spectra to choose a step count")
        momentum = stack_spectra(real) if real else None
        validation_spectra = stack_spectra(validation)
        return search_steps(key, stack_spectra(spectra), validation_spectra, request, stages, real=momentum)
    with stages.stage(f"{format_shape(key)} fit ({request.fit.form}, {request.fit.backend})", 1) as advance:
        robust, guarded = (
            candidates.result() if candidates else fit_candidates(key, spectra, request, bool(validation))
        )
        advance(1)
    if guarded is None or not validation:
        return robust
    return pick_by_validation(robust, guarded, stack_spectra(validation))


@deterministic
def fit_candidates(
    key: ShapeKey, spectra: list[Tensor], request: CalibrationRequest, guarded: bool = True
) -> tuple[FitResult, FitResult | None]:
    """The robust fit and, for a robust run with validation to choose on, the guarded one (fit.guarded_fit:
    also no worse than the baseline on every calibration sample). Needs the calibration spectra only."""
    calibration = stack_spectra(spectra)
    robust = fit(calibration, request.fit, label=format_shape(key))
    if not guarded or request.fit.criterion != "robust":
        return robust, None
    mean_fit_error = robust.robust.get("mean_fit_error", robust.calibration_error)
    return robust, guarded_fit(
        calibration, request.fit, mean_fit_error=mean_fit_error, label=format_shape(key)
    )


def pick_by_validation(fitted: FitResult, guarded: FitResult, validation: Tensor) -> FitResult:
    """Two candidates for a robust run, the one with the lower mean validation error ships: the robust
    fit, and the guarded fit that also holds every calibration sample to the baseline (fit.guarded_fit).
    Neither dominates: the guarded rows give up headroom where the calibration samples agree (qwen
    128×896) and keep it where a few well-conditioned samples pull the robust fit off (llama-3.2-1b
    shared 2048×16384); where the robust rows already meet every guard, the guarded search is a second
    run of the same problem and may end lower. On both independent held-out sets the lower validation
    error picked a candidate at least as good on the mean at every shape measured
    (benchmarks/RESULTS.md "Two candidates, chosen on validation"). The choice looks at
    the validation spectra, so the shipped rows' validation error is the better of two; the bf16 matrix
    check that follows has seen neither. ``baseline_check`` then compares the chosen rows with the
    baseline as before."""
    errors = {
        "robust": mean_error(validation, fitted.schedule),
        "guarded": mean_error(validation, guarded.schedule),
    }
    chosen, other = (guarded, fitted) if errors["guarded"] < errors["robust"] else (fitted, guarded)
    chosen.candidates = {
        "chosen": "guarded" if chosen is guarded else "robust",
        "guard": guarded.robust["guard"],
        **{
            label: {
                "coefficients": [list(row) for row in candidate.schedule.rows],
                "calibration_error": candidate.calibration_error,
                "validation_error": errors[label],
            }
            for label, candidate in (("robust", fitted), ("guarded", guarded))
        },
    }
    chosen.seconds += other.seconds
    chosen.evaluations += other.evaluations
    return chosen


def search_steps(
    key: ShapeKey,
    calibration: Tensor,
    validation: Tensor,
    request: CalibrationRequest,
    stages: Stages,
    *,
    stop_early: bool = True,
    real: Tensor | None = None,
) -> FitResult:
    """--steps auto: rows for k = 2, 3, … on the same spectra, stopping at the first k that reaches the
    target; the fit at that k (or, where none does, at the k with the lowest validation error) carries
    the frontier in ``steps_search``. Each k is the fixed-k fit (robust criterion, bound) with
    ``auto_iterations`` generations, started also from the previous k's rows. ``stop_early=False`` fits
    every k up to MAX_AUTO_STEPS (the whole frontier, for benchmarks); the choice is the same. ``real``:
    the shape's real momentum spectra, on which an absolute target must hold too (None: no real samples)."""
    assert request.target is not None
    settings = replace(request.fit, iterations=auto_iterations(request.fit.iterations))
    reference = settings.stress_baseline
    published = {name: load_table(name).default_schedule for name in TARGET_SETS}
    levels = target_levels(
        request.target,
        {name: mean_error(validation, s) for name, s in published.items()},
        {
            name: {s.name: s.baseline_error for s in stress_sets(calibration, schedule)}
            for name, schedule in published.items()
        }
        if settings.criterion == "robust"
        else {},
        reference,
        has_real=real is not None,
    )
    stressed = stress_spectra(calibration)
    frontier: list[FrontierPoint] = []
    fits: dict[int, FitResult] = {}
    label = f"{format_shape(key)} fit, auto steps (target {request.target.text})"
    with stages.stage(label, MAX_AUTO_STEPS - MIN_AUTO_STEPS + 1) as advance:
        for steps in range(MIN_AUTO_STEPS, MAX_AUTO_STEPS + 1):
            starts = previous_start(fits.get(steps - 1), steps, settings.shared)
            fitted = fit(
                calibration, replace(settings, steps=steps), label=format_shape(key), extra_starts=starts
            )
            fits[steps] = fitted
            shipped, rows = shipped_at(fitted, reference, validation, request.keep_fitted)
            frontier.append(
                FrontierPoint(
                    steps=steps,
                    validation_error=mean_error(validation, rows),
                    stress_errors={name: mean_error(s, rows) for name, s in stressed.items()},
                    shipped=shipped,
                    bound=safety(rows, settings.max_gain).high,
                    rows=rows.rows,
                    seconds=fitted.seconds,
                    real_error=None if real is None else mean_error(real, rows),
                )
            )
            advance(1)
            if stop_early and frontier[-1].reaches(levels):
                break
        advance(MAX_AUTO_STEPS - steps)
    chosen = choose_steps(frontier, levels)
    pick = chosen or min(frontier, key=lambda p: (p.validation_error, p.steps)).steps
    result = fits[pick]
    by_steps = {
        name: {k: mean_error(validation, s.with_steps(k)) for k in range(1, MAX_AUTO_STEPS + 1)}
        for name, s in published.items()
    }
    result.steps_search = frontier_record(key, frontier, levels, request.target, chosen, by_steps)
    result.steps_search["iterations_per_k"] = settings.iterations
    result.seconds = sum(f.seconds for f in fits.values())
    return result


def previous_start(previous: FitResult | None, steps: int, shared: bool) -> dict[str, Schedule] | None:
    """The previous k's rows, continued to ``steps`` (Schedule.expanded), as one more start point."""
    if previous is None:
        return None
    if shared:
        return {"auto:previous k": Schedule(rows=previous.schedule.rows[:1], steps=steps)}
    return {"auto:previous k": previous.schedule.with_steps(steps)}


def shipped_at(
    fitted: FitResult, baseline: str, validation: Tensor, keep_fitted: bool
) -> tuple[str, Schedule]:
    """What the table would ship at the fit's step count by the spectral half of ``baseline_check``: the
    fitted rows, or the baseline's at the same count where the fitted ones lose on validation."""
    rows = baseline_rows(baseline, fitted.schedule.num_steps)
    if keep_fitted or mean_error(validation, fitted.schedule) <= mean_error(validation, rows):
        return "fitted", fitted.schedule
    return baseline, rows


def same_steps_label(name: str, steps: int) -> str:
    """A bundled set's label at ``steps`` steps: its name at its own count, else "name (k steps)"."""
    return name if steps == load_table(name).default_schedule.num_steps else f"{name} ({steps} steps)"


def fit_baseline(fitted: FitResult) -> str:
    """The set the fit was held to (Polar Express per-step, Muon shared), from the fit's own record."""
    return STRESS_BASELINES[str(fitted.method.get("form", "per-step"))]


def check_schedules(key: ShapeKey, fitted: FitResult) -> dict[str, Schedule]:
    """The fitted rows, the baselines at their own counts, and the fit's baseline at the fitted count (the
    fallback compares at equal steps: Polar Express extended by its last row)."""
    schedules = {"calibrated": fitted.schedule, **baseline_schedules(key)}
    name, steps = fit_baseline(fitted), fitted.schedule.num_steps
    schedules.setdefault(same_steps_label(name, steps), baseline_rows(name, steps))
    return schedules


def check_matrices(
    key: ShapeKey, matrices: list[Tensor], fitted: FitResult, request: CalibrationRequest, advance
) -> dict[str, dict[str, list[float]]]:
    """The real iteration on validation matrices against the SVD polar factor, calibrated and baselines."""
    schedules = check_schedules(key, fitted)
    # float32 and bf16 for the calibrated rows; baselines in bf16 only, which keeps the check
    # affordable on a CPU at 4096×11008 (their float32 error equals the spectral one to ~1e-5).
    dtypes = {
        label: ("float32", "bfloat16") if label == "calibrated" else ("bfloat16",) for label in schedules
    }
    return matrix_errors(
        matrices,
        schedules,
        clip_quantile=request.clip_quantile,
        device=request.device,
        dtypes=dtypes,
        advance=advance,
    )


def shape_result(
    key: ShapeKey,
    fitted: FitResult,
    request: CalibrationRequest,
    samples: Sequence[Sample],
    spectra: dict[int, Tensor],
    matrix: dict[str, dict[str, list[float]]],
    seconds: dict[str, float],
) -> ShapeResult:
    """Validation errors and sample counts around a fit; ``spectra`` is keyed by ``id(sample)``.

    ``samples`` only need ``kind`` and ``source`` (the rank-split run passes lightweight records).
    """
    calibration, validation = train_validation_split(samples, request.validation_fraction, seed=request.seed)
    validation_spectra = stack_spectra([spectra[id(s)] for s in validation])
    spectral = {
        label: sample_errors(validation_spectra, s).tolist()
        for label, s in check_schedules(key, fitted).items()
    }
    calibration_spectra = stack_spectra([spectra[id(s)] for s in calibration])
    fallback = baseline_check(fitted, spectral, matrix, request)
    shipped = None
    if fallback is not None and not fallback["kept"]:
        steps = fitted.schedule.num_steps
        shipped = baseline_rows(fallback["to"], steps)
        label = same_steps_label(fallback["to"], steps)
        spectral, matrix = shipped_errors(label, spectral, matrix, validation_spectra, shipped)
    counts = {
        "real": sum(s.kind == "real" for s in samples),
        "synthetic": sum(s.kind == "synthetic" for s in samples),
        "calibration": len(calibration),
        "validation": len(validation),
        "matrix_checked": len(matrix_checked(validation, request)),
    }
    return ShapeResult(
        key=key,
        fit=fitted,
        validation=spectral,
        matrix=matrix,
        sources=[s.source for s in samples],
        counts=counts,
        seconds=seconds,
        shipped=shipped,
        calibration_error=_shipped_error(calibration_spectra, shipped),
        fallback=fallback,
        tails=tail_record(calibration_spectra),
    )


def matrix_checked(validation: Sequence[Sample], request: CalibrationRequest) -> list[Sample]:
    """The first --check-samples validation samples, less recorded spectra: they have no matrix to iterate
    (their spectral errors still count; sampling/recorded.py)."""
    return [s for s in validation[: request.check_samples] if s.has_matrix]


def baseline_check(
    fitted: FitResult,
    spectral: dict[str, list[float]],
    matrix: dict[str, dict[str, list[float]]],
    request: CalibrationRequest,
) -> dict | None:
    """Where the fitted rows lose to the fit's baseline (Polar Express; shared: Muon) on validation, why.

    Losing means a higher mean on either column the summary shows for both: the float64 spectral error of
    the validation samples, or the bf16 matrix error of the checked ones, at the fitted step count (the
    baseline extended by its last row, ``check_schedules``). ``kept`` says --keep-fitted ships them
    anyway; the fitted rows are recorded either way, so they are never lost.
    """
    name = request.fit.stress_baseline
    label = same_steps_label(name, fitted.schedule.num_steps)
    if label not in spectral:
        return None
    fitted_error, baseline_error = _mean(spectral["calibrated"]), _mean(spectral[label])
    reasons = []
    if fitted_error > baseline_error:
        reasons.append(f"validation spectral error {fitted_error:.4f} > {baseline_error:.4f}")
    fitted_bf16 = matrix.get("calibrated", {}).get("bfloat16")
    baseline_bf16 = matrix.get(label, {}).get("bfloat16")
    if fitted_bf16 and baseline_bf16 and _mean(fitted_bf16) > _mean(baseline_bf16):
        reasons.append(f"bf16 matrix error {_mean(fitted_bf16):.4f} > {_mean(baseline_bf16):.4f}")
    if not reasons:
        return None
    return {
        "to": name,
        **({"steps": fitted.schedule.num_steps} if label != name else {}),
        "reason": "; ".join(reasons),
        "fitted_error": fitted_error,
        "baseline_error": baseline_error,
        "fitted_matrix_error_bfloat16": _mean(fitted_bf16) if fitted_bf16 else None,
        "baseline_matrix_error_bfloat16": _mean(baseline_bf16) if baseline_bf16 else None,
        "fitted_coefficients": [list(row) for row in fitted.schedule.rows],
        "fitted_bound": fitted.safety.high,
        "kept": request.keep_fitted,
    }


def baseline_rows(name: str, steps: int) -> Schedule:
    """A bundled table's rows for ``steps`` steps at scale 1, its own scale folded into row 1 (Polar
    Express divides by 1.02·‖G‖_F), so an entry of a scale-1 table computes what the baseline computes."""
    schedule = load_table(name).default_schedule
    rows = fold_scale(schedule.expanded(steps), schedule.scale)
    if len(set(rows)) == 1:
        rows = rows[:1]  # one shared triple stays one row
    return Schedule(rows=rows, steps=steps)


def shipped_errors(name, spectral, matrix, validation_spectra, shipped):
    """The validation errors after a fallback: "calibrated" is the shipped (baseline) rows, measured on the
    spectra and, in bf16, equal to the baseline's matrix check; the fitted rows move to FITTED_LABEL."""
    spectral = {
        "calibrated": sample_errors(validation_spectra, shipped).tolist(),
        FITTED_LABEL: spectral["calibrated"],
        **{k: v for k, v in spectral.items() if k != "calibrated"},
    }
    matrix = {
        "calibrated": {d: v for d, v in matrix.get(name, {}).items()},
        FITTED_LABEL: matrix.get("calibrated", {}),
        **{k: v for k, v in matrix.items() if k != "calibrated"},
    }
    return spectral, matrix


def _shipped_error(calibration_spectra: Tensor, shipped: Schedule | None) -> float | None:
    return None if shipped is None else float(sample_errors(calibration_spectra, shipped).mean())


def tail_record(calibration_spectra: Tensor) -> dict:
    """The deepest tails the rows were fitted and stress-tested on (``report --real`` compares with them)."""
    return {
        "calibration": tail_statistics(calibration_spectra),
        "stress": {name: tail_statistics(s) for name, s in stress_spectra(calibration_spectra).items()},
    }


def baseline_schedules(key: ShapeKey) -> dict[str, Schedule]:
    """Muon and Polar Express everywhere; the ROOT paper only where it published the shape."""
    schedules = {}
    for name in BASELINE_TABLES:
        table = load_table(name)
        if table.entries and key not in table.shapes:
            continue
        schedules[name] = table.schedule_for(key)
    return schedules


def build_table(request: CalibrationRequest, results: Sequence[ShapeResult]) -> CoefficientTable:
    version = next_version(request.out, request.name)
    entries = {
        r.key: {
            "coefficients": [list(row) for row in r.schedule.rows],
            "steps": r.schedule.num_steps,
            "metrics": r.metrics(),
        }
        for r in results
    }
    return CoefficientTable.create(
        name=request.name,
        version=version,
        default_rows=DEFAULT_ROWS,
        default_steps=5,
        entries=entries,
        provenance=provenance(request, results),
        description=f"Calibrated {request.fit.form} Newton–Schulz coefficients for "
        f"{', '.join(format_shape(r.key) for r in results)}",
    )


def provenance(request: CalibrationRequest, results: Sequence[ShapeResult]) -> dict:
    return {
        "tool": f"root-calibrate {calibrate.__version__}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": _device_name(request.device),
        "command": request.command,
        "seed": request.seed,
        "ratio": f"{request.ratio[0]}:{request.ratio[1]}",
        "samples_per_shape": request.samples,
        "validation_fraction": request.validation_fraction,
        "clip_quantile": request.clip_quantile,
        "synthetic_families": family_cycle(request.families),
        # What actually supplied the real samples: --real paths that had a tensor of some shape, and
        # "harvest" where the harvester filled in; per shape in "real_per_shape".
        "real_sources": real_sources_used(request, results),
        "real_per_shape": {format_shape(r.key): real_origins(r) for r in results},
        "corpus": str(request.corpus) if request.corpus else "python-stdlib",
        "harvest_probes": list(parse_probes(request.probes)),
        "search": results[0].fit.method if results else {},
        # --steps auto: each entry's own count is in its steps and metrics.steps_search; "search" above
        # is the first shape's fit at its chosen k.
        **({"steps": "auto", "target": request.target.text} if request.target else {}),
        "default_rows": "muon (KellerJordan/Muon), the ROOT reference's fallback",
        "layers": [
            {"name": s.name, "shape": list(s.shape), "count": s.count} for s in request.layer_shapes or []
        ],
        "sources": {format_shape(r.key): r.sources for r in results},
        # From ROOT's recordings (sources ``file:<recording>:<key>@step<N>``): the training steps used.
        **({"recorded_steps": recorded} if (recorded := recorded_steps(results)) else {}),
        # Only split runs say so, so a single-process table is unchanged by the option existing.
        **({"ranks": request.ranks} if request.ranks > 1 else {}),
    }


def recorded_steps(results: Sequence[ShapeResult]) -> dict[str, list[int]]:
    """Per shape, the recorded training steps its samples come from (none: not from recordings)."""
    steps = {format_shape(r.key): {recorded_step(source) for source in r.sources} - {None} for r in results}
    return {shape: sorted(found) for shape, found in steps.items() if found}


def real_origins(result: ShapeResult) -> dict[str, int]:
    """How many of a shape's real samples came from --real files and how many from the harvester."""
    files = sum(source.startswith("file:") for source in result.sources)
    harvested = sum(source.startswith("harvest:") for source in result.sources)
    return {"files": files, "harvest": harvested}


def real_sources_used(request: CalibrationRequest, results: Sequence[ShapeResult]) -> list[str]:
    sources = [s for r in results for s in r.sources]
    used = [str(p) for p in request.real if any(_from_path(source, p) for source in sources)]
    harvested = any(real_origins(r)["harvest"] for r in results)
    return used + (["harvest"] if harvested or not used else [])


def _from_path(source: str, path: Path) -> bool:
    """Whether a ``file:<file>[:<key>]`` source comes from ``path`` (that file, or a folder above it)."""
    text = f"file:{path}"
    return source == text or source.startswith((f"{text}:", f"{text}/"))


def run(request: CalibrationRequest, stages: Stages) -> tuple[Path, list[ShapeResult]]:
    """Calibrate every shape, then write the table once; nothing is written if any stage fails."""
    files = real_files(request)
    cache = SpectrumCache(request.cache_dir / "spectra" if request.cache_dir else None)
    results = [calibrate_shape(key, request, stages, files.get(key, []), cache) for key in request.shapes]
    table = build_table(request, results)
    return save_table(table, request.out, on_clash="next"), results


def real_files(request: CalibrationRequest) -> dict[ShapeKey, list[Sample]]:
    """The --real samples per shape; a file not marked as momentum is refused (sampling/real.py)."""
    if not request.real:
        return {}
    found = load_real_samples(
        request.real, request.shapes, is_momentum=request.real_is_momentum, flag="--real-is-momentum"
    )
    # ROOT's recordings: spectra clipped at another quantile, or none of an asked shape, are refused here,
    # before any harvest or fit (sampling/recorded.py).
    check_recorded_clip([s for samples in found.values() for s in samples], request.clip_quantile)
    check_recorded_shapes(request.real, request.shapes, found)
    return found


def _spread(samples: list[Sample], count: int) -> list[Sample]:
    """``count`` samples evenly spread over the list (e.g. over a training run's recorded steps)."""
    if len(samples) <= count:
        return list(samples)
    step = len(samples) / count
    return [samples[int(i * step)] for i in range(count)]


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _p95(values: Sequence[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(0.95)) if values else float("nan")


def check_calibration_inputs(request: CalibrationRequest) -> None:
    """Cheap checks that must fail before any long work."""
    if request.samples < 2:
        raise CalibrationError(
            f"invalid --samples {request.samples}: need at least 2 (calibration + validation)"
        )
    if not 0.0 < request.validation_fraction < 1.0:
        raise CalibrationError(f"invalid validation fraction {request.validation_fraction}: expected (0, 1)")
    if request.check_samples < 1:
        raise CalibrationError(f"invalid --check-samples {request.check_samples}: expected ≥ 1")
    family_cycle(request.families)
    if request.fit.storage is not None:
        check_storage(request.fit.storage)
