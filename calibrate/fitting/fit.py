"""Search for the quintic coefficients that minimise the spectral objective within the safety bound.

Backends: scipy (default: differential evolution, a global search, then a Nelder–Mead polish) and
optuna (TPE, resumable and parallel through a storage URL). Both start from the published sets, so a
fit is never worse on the calibration spectra than the best of them that respects the bound.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from root_core.schedule import Schedule
from root_core.tables import PUBLISHED_TABLES, load_table

from ..errors import CalibrationError
from .objective import (
    DEFAULT_MAX_GAIN,
    LOW_RANK_FACTOR,
    LOW_RANK_KEEP,
    STRESS_MODES,
    STRESS_TOLERANCE,
    TAIL_FACTORS,
    TAIL_FRACTION,
    Safety,
    StressSet,
    mean_error,
    penalised_objective,
    rows_from_vector,
    safety,
    stress_excess,
    stress_sets,
)

BACKENDS = ("scipy", "optuna")
SCHEDULE_FORMS = ("per-step", "shared")
# "robust": the mean error, subject to being no worse than the baseline on every stress set (issue 10);
# "mean": the mean error alone, the fit before issue 10.
FIT_CRITERIA = ("robust", "mean")
# The baseline a robust fit must match on the stress sets, per schedule form (bundled tables): Polar
# Express's rows (extended by its last row beyond 5 steps), or Muon's triple for one shared triple.
STRESS_BASELINES = {"per-step": "polar-express", "shared": "muon"}
# Names of the per-sample constraints of a guarded fit (``sample_guards``): "sample-0", "sample-1", ...
GUARD_PREFIX = "sample-"
# Search boxes per row. They contain every published set (Polar Express's first row is
# (8.16, −22.5, 15.9)) with room to spare; a > 0 keeps small singular values growing.
SHARED_BOUNDS = [(0.5, 6.0), (-12.0, 1.0), (-1.0, 8.0)]
PER_STEP_BOUNDS = [(0.5, 9.5), (-26.0, 2.0), (-2.0, 19.0)]
# The search scores compressed spectra (this many evenly spaced order statistics per sample): the
# mean over 512 quantiles tracks the full mean closely and makes an evaluation ~10× cheaper at r=4096.
SEARCH_POINTS = 512
# The stress sets are scored on fewer order statistics in the search: three sets at 512 points made an
# evaluation 4-5× as costly as the mean error alone (fit 15→72 s at 256x256 on a loaded 2-core CPU);
# the guarantee itself is checked on the full spectra (``_best_feasible``), after a repair polish if needed.
STRESS_SEARCH_POINTS = 128
# Nelder–Mead evaluations per search iteration: 200 iterations give 20k, enough to settle 15 digits-worth
# of parameters, while a quick 5-iteration run stays quick.
POLISH_EVALUATIONS_PER_ITERATION = 100
# Attempts at opening an optuna storage that other workers are creating at the same moment.
STORAGE_ATTEMPTS = 5


@dataclass
class FitSettings:
    steps: int = 5
    form: str = "per-step"
    max_gain: float = DEFAULT_MAX_GAIN
    backend: str = "scipy"
    seed: int = 0
    iterations: int = 200  # DE generations, or optuna trials ÷ 10
    storage: str | None = None
    criterion: str = "robust"
    stress_mode: str = "constraint"

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
        if self.criterion not in FIT_CRITERIA:
            raise CalibrationError(
                f"invalid --fit '{self.criterion}': expected one of {', '.join(FIT_CRITERIA)}"
            )
        if self.stress_mode not in STRESS_MODES:
            raise CalibrationError(
                f"invalid stress mode '{self.stress_mode}': expected one of {', '.join(STRESS_MODES)}"
            )

    @property
    def shared(self) -> bool:
        return self.form == "shared"

    def record(self) -> dict[str, object]:
        """The settings a table's provenance records for its search (the fit result adds its own details)."""
        return {
            "backend": self.backend,
            "form": self.form,
            "steps": self.steps,
            "max_gain": self.max_gain,
            "seed": self.seed,
            "iterations": self.iterations,
            "criterion": self.criterion,
        }

    @property
    def stress_baseline(self) -> str:
        return STRESS_BASELINES[self.form]


@dataclass
class FitResult:
    schedule: Schedule
    calibration_error: float
    safety: Safety
    start_errors: dict[str, float]
    evaluations: int
    seconds: float
    method: dict[str, object] = field(default_factory=dict)
    # The stress sets' errors next to the baseline's, and the price in mean error (``robust_report``).
    robust: dict[str, object] = field(default_factory=dict)
    # --steps auto: the target, the frontier (errors and FLOPs per k) and the chosen k
    # (calibrate/fitting/steps.py).
    steps_search: dict[str, object] = field(default_factory=dict)
    # The robust fit and the guarded one (``guarded_fit``) with their validation errors, and which the
    # table ships: the lower (calibrate/fitting/pipeline.py ``pick_by_validation``).
    candidates: dict[str, object] = field(default_factory=dict)


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
    for name in PUBLISHED_TABLES:  # every published set is a start point
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
    """X/s through row (a, b, c) equals X through (a/s, b/s³, c/s⁵) (docs/design.md §1)."""
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
    """Fit one schedule to the calibration spectra (samples × r) of one shape, e.g. label "2048x8192".

    Both criteria fit the mean error first. The robust one then needs the rows to be no worse than the
    baseline (``STRESS_BASELINES``) on every stress set of the calibration spectra; where the mean fit
    already is, it is the robust fit too (the constrained optimum of a problem whose unconstrained
    optimum is feasible), else a second search runs under the constraint. A shared optuna storage always
    gets the robust search (workers joining it must score one objective); the reference mean fit then
    runs without the storage.
    """
    started = time.perf_counter()
    baseline = load_table(settings.stress_baseline).default_schedule.with_steps(settings.steps)
    stress = stress_sets(spectra, baseline)
    if settings.criterion == "mean":
        result = _search_fit(spectra, settings, label, extra_starts, stress=())
        result.robust = robust_report(result, result.calibration_error, stress, settings, searches=1)
        return result
    mean_fit = _search_fit(spectra, replace(settings, storage=None), label, extra_starts, stress=())
    if settings.storage is None and stress_excess(mean_fit.schedule, stress) == 0.0:
        robust, searches = mean_fit, 1
    else:
        robust, searches = _search_fit(spectra, settings, label, extra_starts, stress=stress), 2
    robust.robust = robust_report(robust, mean_fit.calibration_error, stress, settings, searches=searches)
    robust.evaluations += mean_fit.evaluations if robust is not mean_fit else 0
    robust.seconds = time.perf_counter() - started
    return robust


def robust_report(
    chosen: FitResult,
    mean_fit_error: float,
    stress: Sequence[StressSet],
    settings: FitSettings,
    searches: int,
) -> dict[str, object]:
    """What the table records: each stress set's error next to the baseline's, and the price in mean error."""
    sets = {}
    for s in stress:
        error = mean_error(s.spectra, chosen.schedule)
        sets[s.name] = {
            "error": error,
            "baseline_error": s.baseline_error,
            "guaranteed": error <= s.baseline_error + STRESS_TOLERANCE,
        }
    return {
        "criterion": settings.criterion,
        "baseline": settings.stress_baseline,
        "stress_sets": {
            "tail": f"lowest {TAIL_FRACTION:.0%} of σ times {', '.join(map(str, TAIL_FACTORS.values()))}",
            "low-rank": f"all but the top {LOW_RANK_KEEP:.1%} of σ times {LOW_RANK_FACTOR}",
        },
        "stress": sets,
        "guaranteed": [name for name, v in sets.items() if v["guaranteed"]],
        "mean_fit_error": mean_fit_error,
        "robust_fit_error": chosen.calibration_error if settings.criterion == "robust" else None,
        "price": chosen.calibration_error - mean_fit_error,
        "searches": searches,
    }


def sample_guards(spectra: Tensor, baseline: Schedule) -> list[StressSet]:
    """One constraint per calibration sample: the rows may not be worse than ``baseline`` on it."""
    return [
        StressSet(f"{GUARD_PREFIX}{i}", spectra[i : i + 1], mean_error(spectra[i : i + 1], baseline))
        for i in range(spectra.shape[0])
    ]


def guarded_fit(
    spectra: Tensor, settings: FitSettings, *, mean_fit_error: float, label: str = ""
) -> FitResult:
    """The rows with the lowest mean error that are no worse than the baseline on *every* calibration
    sample (and, robust, on every stress set): the second candidate of a calibration
    (pipeline.pick_by_validation). A mean, even a robust one, may buy its gain by losing on a few
    samples, and momentum the fit never saw may hold more of those (benchmarks/RESULTS.md "Two
    candidates, chosen on validation"). The baseline start meets every guard, so the search always
    has a feasible point. ``mean_fit_error``: the unconstrained fit's calibration error, against which
    the report states the price."""
    started = time.perf_counter()
    baseline = load_table(settings.stress_baseline).default_schedule.with_steps(settings.steps)
    stress = stress_sets(spectra, baseline)
    held_to = stress if settings.criterion == "robust" else []
    local = replace(settings, storage=None, stress_mode="constraint")
    result = _search_fit(spectra, local, label, None, stress=held_to + sample_guards(spectra, baseline))
    result.robust = robust_report(result, mean_fit_error, stress, settings, 1)
    result.robust["guard"] = f"every calibration sample no worse than {settings.stress_baseline}"
    result.seconds = time.perf_counter() - started
    return result


def _search_fit(
    spectra: Tensor,
    settings: FitSettings,
    label: str,
    extra_starts: Mapping[str, Schedule] | None,
    *,
    stress: Sequence[StressSet],
) -> FitResult:
    """One search: the mean error within the bound, and no worse than the baseline on ``stress`` if given."""
    started = time.perf_counter()
    search_spectra = compress(spectra)
    search_stress = [_compressed_stress(s, settings) for s in stress]
    bounds = SHARED_BOUNDS if settings.shared else PER_STEP_BOUNDS * settings.steps
    starts = {**start_schedules(settings.steps, settings.shared), **(extra_starts or {})}
    counter = [0]

    def objective(vector: np.ndarray) -> float:
        counter[0] += 1
        return penalised_objective(
            vector,
            search_spectra,
            steps=settings.steps,
            shared=settings.shared,
            max_gain=settings.max_gain,
            stress=search_stress,
            stress_mode=settings.stress_mode,
        )

    search = _search_scipy if settings.backend == "scipy" else _search_optuna
    found, method = search(
        objective,
        bounds,
        {name: to_vector(s, bounds) for name, s in starts.items()},
        settings,
        _study_name(settings, label, search_spectra, robust=bool(stress)),
    )
    polished = _polish(
        objective, found, bounds, budget=POLISH_EVALUATIONS_PER_ITERATION * settings.iterations
    )
    start_errors = {label: mean_error(spectra, s) for label, s in starts.items()}
    vectors = [polished, found]
    if stress and stress_excess(Schedule(rows=_rows(polished, settings), steps=settings.steps), stress) > 0:
        vectors.insert(0, _repaired(polished, spectra, stress, settings, bounds))
    schedule = _best_feasible(vectors, starts, spectra, settings, stress)
    return FitResult(
        schedule=schedule,
        calibration_error=mean_error(spectra, schedule),
        safety=safety(schedule, settings.max_gain),
        start_errors=start_errors,
        evaluations=counter[0],
        seconds=time.perf_counter() - started,
        method={
            **settings.record(),
            "bounds": [list(b) for b in bounds[:3]],
            "search_points": SEARCH_POINTS,
            **({"stress_mode": settings.stress_mode} if settings.criterion == "robust" else {}),
            **method,
        },
    )


def _compressed_stress(stress: StressSet, settings: FitSettings) -> StressSet:
    """The stress set as the search scores it, with the baseline's error on that compressed form."""
    baseline = load_table(settings.stress_baseline).default_schedule.with_steps(settings.steps)
    spectra = compress(stress.spectra, STRESS_SEARCH_POINTS)
    return StressSet(stress.name, spectra, mean_error(spectra, baseline))


def _repaired(
    vector: np.ndarray, spectra: Tensor, stress: Sequence[StressSet], settings, bounds
) -> np.ndarray:
    """A point the search found feasible on compressed spectra may break a binding stress constraint on
    the full ones by round-off-sized amounts; a short polish on the full objective moves it back inside."""

    def full(v: np.ndarray) -> float:
        return penalised_objective(
            v,
            spectra,
            steps=settings.steps,
            shared=settings.shared,
            max_gain=settings.max_gain,
            stress=stress,
        )

    return _polish(full, vector, bounds, budget=POLISH_EVALUATIONS_PER_ITERATION * 10)


def _best_feasible(
    vectors,
    starts: Mapping[str, Schedule],
    spectra: Tensor,
    settings: FitSettings,
    stress: Sequence[StressSet] = (),
) -> Schedule:
    """The lowest full-spectrum error among the found points and the starts that respect the bound and,
    with ``stress``, match the baseline on every full-spectrum stress set (the baseline start always does,
    so the robust fit exists wherever the baseline is within --max-gain; below that, the safe candidate
    closest to meeting them, which the fit's report marks as not guaranteed)."""
    candidates = [Schedule(rows=_rows(v, settings), steps=settings.steps) for v in vectors]
    candidates += list(starts.values())
    feasible = [s for s in candidates if safety(s, settings.max_gain).ok]
    if not feasible:
        raise CalibrationError(
            f"no coefficient set found within --max-gain {settings.max_gain}; raise it (Muon's needs 1.21)"
        )
    if stress:
        meeting = [s for s in feasible if stress_excess(s, stress) == 0.0]
        if not meeting:
            # Only where the baseline itself breaks --max-gain: the closest to it, as the report says.
            return min(feasible, key=lambda s: (stress_excess(s, stress), mean_error(spectra, s)))
        feasible = meeting
    return min(feasible, key=lambda s: mean_error(spectra, s))


def _rows(vector: np.ndarray, settings: FitSettings):
    return rows_from_vector(vector, settings.steps, settings.shared)


def _search_scipy(
    objective: Callable, bounds, starts: Mapping[str, np.ndarray], settings: FitSettings, study: str
):
    from scipy.optimize import differential_evolution

    rng = np.random.default_rng(settings.seed)
    population_size = max(15, 5 * len(bounds))
    low, high = np.array(bounds).T
    random_members = low + rng.random((population_size - len(starts), len(bounds))) * (high - low)
    population = np.vstack([*starts.values(), random_members])
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


def _search_optuna(
    objective: Callable, bounds, starts: Mapping[str, np.ndarray], settings: FitSettings, study_name: str
):
    """TPE over the box; with a storage, one study shared by every worker that scores the same objective.

    Workers may start together: the storage's tables and the study are created by whichever gets there
    first (the others load them), only the creator adds the start points (as finished trials, so no two
    workers can take the same queued one), and all workers together stop at iterations × 10 finished
    trials, so a resume of a finished study adds none. The budget counts COMPLETE trials only: a worker
    killed mid-trial leaves that trial RUNNING for good (no heartbeat: 17% more search time on
    PostgreSQL, benchmarks/RESULTS.md), and the others, or a re-run, make up for it.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [f"x{i}" for i in range(len(bounds))]
    budget = settings.iterations * 10
    storage = None if settings.storage is None else _open_storage(settings.storage)
    # Without a storage the search is reproducible from --seed; with one, workers sharing the study must
    # draw different trials, and the order in which they finish trials is not reproducible anyway.
    seed = settings.seed if storage is None else _worker_seed(settings.seed)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    try:
        try:
            study = optuna.create_study(
                direction="minimize",
                sampler=sampler,
                storage=storage,
                study_name=study_name,
                load_if_exists=False,
            )
        except optuna.exceptions.DuplicatedStudyError:  # created by another worker or an earlier run
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        else:
            distributions = {
                n: optuna.distributions.FloatDistribution(lo, hi)
                for n, (lo, hi) in zip(names, bounds, strict=True)
            }
            for label, start in starts.items():
                value = objective(start)
                if math.isfinite(value):
                    study.add_trial(
                        optuna.trial.create_trial(
                            params=dict(zip(names, map(float, start), strict=True)),
                            distributions=distributions,
                            value=value,
                            user_attrs={"start": label},
                        )
                    )
        remaining = budget - _finished(study)
        if remaining > 0:
            study.optimize(
                lambda trial: objective(
                    np.array(
                        [trial.suggest_float(n, lo, hi) for n, (lo, hi) in zip(names, bounds, strict=True)]
                    )
                ),
                n_trials=remaining,
                callbacks=[optuna.study.MaxTrialsCallback(budget, states=(TrialState.COMPLETE,))],
            )
        best_trial = study.best_trial  # one read: with other workers still adding trials, it may move
        best = np.array([best_trial.params[n] for n in names])
        trials = _finished(study)
    except (optuna.exceptions.StorageInternalError, _sqlalchemy_error()) as error:
        raise _storage_error(settings.storage, error) from error
    method: dict[str, object] = {
        "global": "optuna.TPESampler",
        "trials": trials,
        "study": study.study_name,
        "best_trial": best_trial.number,  # the study's best when this worker read it; polished after
    }
    if storage is not None:
        method["shared_storage"] = True
        method["reproducible"] = False  # workers' trials interleave; each samples from its own seed
    return best, method


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _worker_seed(seed: int) -> int:
    """Distinct per process and machine, so workers sharing a study do not draw the same trials."""
    key = f"{seed}:{socket.gethostname()}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _sqlalchemy_error() -> type[Exception]:
    import sqlalchemy.exc

    return sqlalchemy.exc.SQLAlchemyError


def _open_storage(url: str):
    """The optuna RDB storage at url; workers starting together on a new database race on its tables."""
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    jitter = random.Random()  # its own generator: the global one stays untouched
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (
            sqlalchemy.exc.OperationalError,  # SQLite: "table studies already exists"
            sqlalchemy.exc.ProgrammingError,  # PostgreSQL: "relation ... already exists"
            sqlalchemy.exc.IntegrityError,
        ) as error:
            # Another worker created a table or stamped the schema version between our check and our
            # write ("already exists", "UNIQUE constraint failed: alembic_version.version_num"); a
            # later attempt finds them in place. Creation has several such steps, so a third worker
            # can lose a second race: a few attempts, not one.
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
            if racing and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(jitter.uniform(0.05, 0.25) * (attempt + 1))
                continue
            raise _storage_error(url, error) from error
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError) as error:
            raise _storage_error(url, error) from error
    raise AssertionError("unreachable")


def check_storage(url: str) -> None:
    """Open the storage once before any long work: a bad URL fails in a second, not after the spectra."""
    _open_storage(url).engine.dispose()


def _storage_error(url: str | None, error: BaseException) -> CalibrationError:
    """One line naming the storage (password hidden) and the database's own reason."""
    cause = error
    while cause.__cause__ is not None and not getattr(cause, "orig", None):
        cause = cause.__cause__
    reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    hint = "check the URL, that its directory or server exists, and that the database driver is installed"
    return CalibrationError(
        f"optuna storage '{_masked(url)}' failed: {reason[0] if reason else type(cause).__name__} ({hint})"
    )


def _masked(url: str | None) -> str:
    """The URL as given, its password (if any) replaced by ***; re-rendering it would re-encode the rest
    (a socket folder in ?host=/run/pg would read %2Frun%2Fpg)."""
    match = re.match(r"[\w+]+://[^:/@]*:([^@/]*)@", url or "")
    if match is None:
        return str(url)
    return f"{url[: match.start(1)]}***{url[match.end(1) :]}"


def _study_name(settings: FitSettings, label: str, spectra: Tensor, robust: bool = False) -> str:
    """One study per shape, setting and objective, so workers sharing a storage join the same search.

    The digest of the (compressed) calibration spectra stands for everything that shapes them —
    --samples, --ratio, --real, --clip-quantile, the seed — so workers with different inputs get
    separate studies instead of mixing trials scored on different objectives.
    """
    form = f"{settings.form}:{settings.steps}steps:gain{settings.max_gain}"
    if robust:  # another objective: the stress constraint (its mode too) changes every score
        form += f":robust-{settings.stress_mode}"
    return f"root-calibrate:{label}:{form}:seed{settings.seed}:spectra-{spectra_digest(spectra)}"


def spectra_digest(spectra: Tensor) -> str:
    """A short hash of the spectra's values, shape and dtype: equal only for bitwise equal spectra."""
    array = spectra.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype}:{array.shape}:".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:12]


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
