"""Search for the quintic coefficients that minimise the spectral objective within the safety bound.

Backends: scipy (default: differential evolution, a global search, then a Nelder–Mead polish) and
optuna (TPE, resumable and parallel through a storage URL). Both start from the published sets, so a
fit is never worse on the calibration spectra than the best of them that respects the bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from root_core.schedule import Schedule
from root_core.tables import load_table

from .errors import CalibrationError
from .objective import DEFAULT_MAX_GAIN, Safety, mean_error, penalised_objective, rows_from_vector, safety

BACKENDS = ("scipy", "optuna")
SCHEDULE_FORMS = ("per-step", "shared")
# Search boxes per row. They contain every published set (Polar Express's first row is
# (8.16, −22.5, 15.9)) with room to spare; a > 0 keeps small singular values growing.
SHARED_BOUNDS = [(0.5, 6.0), (-12.0, 1.0), (-1.0, 8.0)]
PER_STEP_BOUNDS = [(0.5, 9.5), (-26.0, 2.0), (-2.0, 19.0)]
# The search scores compressed spectra (this many evenly spaced order statistics per sample): the
# mean over 512 quantiles tracks the full mean closely and makes an evaluation ~10× cheaper at r=4096.
SEARCH_POINTS = 512
# Nelder–Mead evaluations per search iteration: 200 iterations give 20k, enough to settle 15 digits-worth
# of parameters, while a quick 5-iteration run stays quick.
POLISH_EVALUATIONS_PER_ITERATION = 100
# Published sets used as start points (bundled baseline tables); see coeff_tables/*/v1.json.
START_TABLES = ("muon", "polar-express", "root-paper", "you-6step", "classic")


@dataclass
class FitSettings:
    steps: int = 5
    form: str = "per-step"
    max_gain: float = DEFAULT_MAX_GAIN
    backend: str = "scipy"
    seed: int = 0
    iterations: int = 200  # DE generations, or optuna trials ÷ 10
    storage: str | None = None

    def __post_init__(self) -> None:
        if self.form not in SCHEDULE_FORMS:
            raise CalibrationError(
                f"invalid schedule '{self.form}': expected one of {', '.join(SCHEDULE_FORMS)}"
            )
        if self.backend not in BACKENDS:
            raise CalibrationError(f"invalid backend '{self.backend}': expected one of {', '.join(BACKENDS)}")
        if not 1 <= self.steps <= 20:
            raise CalibrationError(f"invalid steps {self.steps}: expected an integer in [1, 20]")
        if not self.max_gain > 1.0:
            raise CalibrationError(
                f"invalid max gain {self.max_gain}: expected a number > 1 (P must reach 1)"
            )
        if self.storage is not None and self.backend != "optuna":
            raise CalibrationError("--storage needs --backend optuna")

    @property
    def shared(self) -> bool:
        return self.form == "shared"


@dataclass
class FitResult:
    schedule: Schedule
    calibration_error: float
    safety: Safety
    start_errors: dict[str, float]
    evaluations: int
    seconds: float
    method: dict[str, object] = field(default_factory=dict)


def compress(spectra: Tensor, points: int = SEARCH_POINTS) -> Tensor:
    """Evenly spaced order statistics of each (sorted) spectrum, for a cheaper search objective."""
    r = spectra.shape[-1]
    if r <= points:
        return spectra
    index = torch.linspace(0, r - 1, points).round().long()
    return spectra[..., index]


def start_schedules(steps: int, shared: bool) -> dict[str, Schedule]:
    """Published sets as unscaled schedules of the requested form; the scale is folded into row 1."""
    starts: dict[str, Schedule] = {}
    for name in START_TABLES:
        table = load_table(name)
        candidates = {name: table.default_schedule}
        candidates.update({f"{name}:{m}x{n}": table.schedule_for((m, n)) for m, n in table.shapes})
        for label, schedule in candidates.items():
            rows = fold_scale(schedule.expanded(steps), schedule.scale)
            if shared and len(set(schedule.rows)) == 1 and schedule.scale == 1.0:
                starts[label] = Schedule(rows=rows[:1], steps=steps)
            elif not shared:
                starts[label] = Schedule(rows=rows, steps=steps)
    return starts


def fold_scale(rows: Sequence[tuple[float, float, float]], scale: float) -> tuple:
    """X/s through row (a, b, c) equals X through (a/s, b/s³, c/s⁵) (DESIGN.md §1)."""
    (a, b, c), *rest = rows
    return ((a / scale, b / scale**3, c / scale**5), *rest)


def to_vector(schedule: Schedule, bounds: Sequence[tuple[float, float]]) -> np.ndarray:
    vector = np.array([v for row in schedule.rows for v in row], dtype=np.float64)
    low, high = np.array(bounds).T
    return np.clip(vector, low, high)


def fit(
    spectra: Tensor,
    settings: FitSettings,
    *,
    label: str = "",
    extra_starts: Mapping[str, Schedule] | None = None,
) -> FitResult:
    """Fit one schedule to the calibration spectra (samples × r) of one shape, e.g. label "2048x8192"."""
    started = time.perf_counter()
    search_spectra = compress(spectra)
    bounds = SHARED_BOUNDS if settings.shared else PER_STEP_BOUNDS * settings.steps
    starts = {**start_schedules(settings.steps, settings.shared), **(extra_starts or {})}
    counter = [0]

    def objective(vector: np.ndarray) -> float:
        counter[0] += 1
        return penalised_objective(
            vector, search_spectra, steps=settings.steps, shared=settings.shared, max_gain=settings.max_gain
        )

    search = _search_scipy if settings.backend == "scipy" else _search_optuna
    found, method = search(
        objective, bounds, [to_vector(s, bounds) for s in starts.values()], settings, label
    )
    polished = _polish(
        objective, found, bounds, budget=POLISH_EVALUATIONS_PER_ITERATION * settings.iterations
    )
    start_errors = {label: mean_error(spectra, s) for label, s in starts.items()}
    schedule = _best_feasible([polished, found], starts, spectra, settings)
    return FitResult(
        schedule=schedule,
        calibration_error=mean_error(spectra, schedule),
        safety=safety(schedule, settings.max_gain),
        start_errors=start_errors,
        evaluations=counter[0],
        seconds=time.perf_counter() - started,
        method={
            "backend": settings.backend,
            "form": settings.form,
            "steps": settings.steps,
            "max_gain": settings.max_gain,
            "seed": settings.seed,
            "iterations": settings.iterations,
            "bounds": [list(b) for b in bounds[:3]],
            "search_points": SEARCH_POINTS,
            **method,
        },
    )


def _best_feasible(
    vectors, starts: Mapping[str, Schedule], spectra: Tensor, settings: FitSettings
) -> Schedule:
    """The lowest full-spectrum error among the found points and the starts that respect the bound."""
    candidates = [Schedule(rows=_rows(v, settings), steps=settings.steps) for v in vectors]
    candidates += list(starts.values())
    feasible = [s for s in candidates if safety(s, settings.max_gain).ok]
    if not feasible:
        raise CalibrationError(
            f"no coefficient set found within --max-gain {settings.max_gain}; raise it (Muon's needs 1.21)"
        )
    return min(feasible, key=lambda s: mean_error(spectra, s))


def _rows(vector: np.ndarray, settings: FitSettings):
    return rows_from_vector(vector, settings.steps, settings.shared)


def _search_scipy(objective: Callable, bounds, starts: list[np.ndarray], settings: FitSettings, label: str):
    from scipy.optimize import differential_evolution

    rng = np.random.default_rng(settings.seed)
    population_size = max(15, 5 * len(bounds))
    low, high = np.array(bounds).T
    random_members = low + rng.random((population_size - len(starts), len(bounds))) * (high - low)
    population = np.vstack([*starts, random_members])
    with np.errstate(over="ignore"):  # DE's convergence test squares penalty values of 1e6
        result = differential_evolution(
            objective,
            bounds,
            init=population,
            seed=settings.seed,
            maxiter=settings.iterations,
            tol=1e-7,
            polish=False,
            mutation=(0.5, 1.0),
            recombination=0.9,
        )
    return result.x, {
        "global": "scipy.differential_evolution",
        "population": population_size,
        "generations": int(result.nit),
    }


def _search_optuna(objective: Callable, bounds, starts: list[np.ndarray], settings: FitSettings, label: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [f"x{i}" for i in range(len(bounds))]
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
        storage=settings.storage,
        study_name=_study_name(settings, label),
        load_if_exists=True,
    )
    if not study.trials:  # a resumed study already holds the starts
        for start in starts:
            study.enqueue_trial(dict(zip(names, map(float, start), strict=True)))
    study.optimize(
        lambda trial: objective(
            np.array([trial.suggest_float(n, lo, hi) for n, (lo, hi) in zip(names, bounds, strict=True)])
        ),
        n_trials=settings.iterations * 10,
    )
    best = np.array([study.best_params[n] for n in names])
    return best, {"global": "optuna.TPESampler", "trials": len(study.trials), "study": study.study_name}


def _study_name(settings: FitSettings, label: str) -> str:
    """One study per shape and setting, so workers sharing a storage join the same search."""
    form = f"{settings.form}:{settings.steps}steps:gain{settings.max_gain}"
    return f"root-calibrate:{label}:{form}:seed{settings.seed}"


def _polish(objective: Callable, vector: np.ndarray, bounds, *, budget: int) -> np.ndarray:
    """Nelder–Mead from the global optimum: DE lands in the right basin, NM finishes the digits."""
    from scipy.optimize import minimize

    result = minimize(
        objective,
        vector,
        method="Nelder-Mead",
        bounds=bounds,
        options={"maxfev": budget, "xatol": 1e-9, "fatol": 1e-12},
    )
    return result.x if result.fun <= objective(vector) else vector
