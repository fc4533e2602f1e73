"""``torchrun --nproc-per-node N -m calibrate …``: the expensive stages split across ranks, one table.

Sample ``i`` of a shape is the same matrix whichever rank makes it (files, then the harvest, then the
synthetic ones, ``pipeline.plan_samples``): synthetic samples are seeded by (seed, shape, family, index)
and a harvest by (seed, shape), never by rank. So the split changes who computes, not what, and the
table equals a single-process run's. Every rank runs the same phases, each ending in one collective:

1. samples and spectra: work units (a shape's whole harvest — one training run makes all its samples —
   or one file or synthetic sample) go to ranks by estimated cost, largest first to the least-loaded
   rank (``assign_owners``, as ROOT's own DDP split); ``all_gather_object`` of the spectra;
2. fit: rank 0 fits every shape (cheap next to 1., and an optuna storage sees one writer); broadcast;
3. matrix check: each checked validation sample on the rank that made it, which holds the matrix
   (sending a 4096×11008 matrix would cost more than checking it); ``all_gather_object``;
4. table: rank 0 writes it once and broadcasts the path.

A failure on any rank travels with the gathered results, so every rank raises at the same collective
and none waits for a peer that will never come; rank 0 prints it. The group is gloo whatever --device
is: the collectives carry small CPU objects (spectra, errors); with --device cuda each rank computes on
cuda:LOCAL_RANK, and --device cuda:N is refused (``rank_device``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from root_core.distributed import assign_owners
from root_core.tables import TableError, save_table

from ..errors import CalibrationError
from ..progress import Stages
from ..sampling import Sample
from ..sampling.harvest import DEFAULT_TOKENS_PER_STEP, resolve_steps
from ..sampling.mix import reject_non_finite, train_validation_split
from ..sampling.synthetic import family_at, synthetic_sample, synthetic_source
from ..shapes import format_shape
from ..spectra import SpectrumCache
from . import pipeline
from .pipeline import CalibrationRequest, SamplePlan, ShapeKey, ShapeResult

T = TypeVar("T")
# Ranks legitimately wait as long as the slowest rank's share (a harvest is ~2 min per shape on a CPU)
# or rank 0's fits; a rank that dies is caught by torchrun, which stops the others. So the timeout only
# bounds a peer that hangs, and must not cut a long run short.
COLLECTIVE_TIMEOUT = timedelta(hours=12)
# Failures the CLI reports as one line; any other exception is described with its type.
AGREED = (CalibrationError, TableError)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch; rank 0 of 1 outside one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK (from ``env``, default the process's environment);
    a single process when they are absent."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Launch()
    try:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise CalibrationError(
            f"bad torchrun environment: RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r}"
        ) from None


def rank_device(device: str, place: Launch) -> str:
    """The device this rank computes on, for a --device already read as cpu, cuda or cuda:N.

    Under torchrun each rank has its own GPU, so "cuda" means cuda:LOCAL_RANK. "cuda:N" would put every
    rank of the node on GPU N (or pick one per rank by a rule nobody wrote down), so it is refused.
    """
    if place.world <= 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise CalibrationError(
            f"invalid --device '{device}' under torchrun ({place.world} ranks): each rank computes on its "
            "own GPU, cuda:LOCAL_RANK; pass --device cuda"
        )
    return f"cuda:{place.local_rank}"


@dataclass(frozen=True)
class Team(Launch):
    """The ranks of one calibration: collectives that carry results and failures alike."""

    @property
    def split(self) -> bool:
        return self.world > 1

    def gather(self, work: Callable[[], T]) -> list[T]:
        """Every rank's result of ``work``, on every rank; a failure anywhere raises on every rank."""
        if not self.split:
            return [work()]
        failure: BaseException | None = None
        try:
            outcome: tuple[bool, Any] = (True, work())
        except Exception as error:
            failure, outcome = error, (False, _describe(error))
        outcomes: list[Any] = [None] * self.world
        dist.all_gather_object(outcomes, outcome)
        self._raise_failures(outcomes, failure)
        return [value for _, value in outcomes]

    def agree(self, work: Callable[[], T]) -> T:
        """This rank's result of ``work`` once every rank has succeeded at it (e.g. input checks)."""
        return self.gather(work)[self.rank]

    def from_leader(self, work: Callable[[], T]) -> T:
        """Rank 0's result of ``work``, broadcast; its failure raises on every rank."""
        if not self.split:
            return work()
        failure: BaseException | None = None
        outcome: Any = None
        if self.leader:
            try:
                outcome = (True, work())
            except Exception as error:
                failure, outcome = error, (False, _describe(error))
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        self._raise_failures([box[0]] + [(True, None)] * (self.world - 1), failure)
        return box[0][1]

    def _raise_failures(self, outcomes: list[Any], mine: BaseException | None) -> None:
        """The failing rank re-raises its own error (with its traceback); the others name that rank."""
        if mine is not None:
            raise mine
        for rank, (ok, value) in enumerate(outcomes):
            if not ok:
                raise CalibrationError(f"rank {rank}: {value}")


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, AGREED) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def joined() -> Iterator[Team]:
    """This process as a Team: alone, or in the gloo group of its torchrun launch (torn down after)."""
    place = launch()
    if place.world <= 1:
        yield Team()
        return
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Team(place.rank, place.world, place.local_rank)
        # Normal exits only (agreed failures included, which return an exit code): every rank gets here,
        # so no rank tears down its connections — or exits, making torchrun stop the others before
        # rank 0 has printed — while another still needs them. An unexpected exception skips it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the split run


@dataclass(frozen=True)
class Unit:
    """Samples one rank makes: a shape's harvest (indices of the whole run) or one file/synthetic sample."""

    key: ShapeKey
    kind: str  # "file", "harvest" or "synthetic"
    indices: tuple[int, ...]
    cost: float


@dataclass(frozen=True)
class SampleRecord:
    """What the other ranks need of a sample: its place, kind, source and spectrum (no matrix)."""

    key: ShapeKey
    index: int
    kind: str
    source: str
    spectrum: Tensor
    seconds: dict[str, float]
    has_matrix: bool = True  # False for a recorded spectrum: nothing for the matrix check


def run(request: CalibrationRequest, stages: Stages, team: Team) -> tuple[Path, list[ShapeResult]]:
    """``pipeline.run`` for one process; across the team's ranks otherwise, with the same table."""
    if not team.split:
        return pipeline.run(request, stages)
    request = dataclasses.replace(request, ranks=team.world)
    checked: dict[ShapeKey, list[int]] = {}
    held: dict[tuple[ShapeKey, int], Sample] = {}
    # Everything a rank does on its own runs inside a gather, so a failure anywhere reaches every rank.
    made = team.gather(lambda: make_share(request, stages, team, checked, held))
    records = _by_shape([r for rank_records in made for r in rank_records])
    fits = team.from_leader(lambda: fit_all(records, request, stages))
    errors = team.gather(lambda: check_held(held, fits, request, stages, team))
    results = [
        shape_result(key, records[key], fits[key], _merge_checks(key, checked[key], errors), request)
        for key in request.shapes
    ]
    # on_clash="next": another run may have taken the version build_table picked while this one worked.
    path = team.from_leader(
        lambda: save_table(pipeline.build_table(request, results), request.out, on_clash="next")
    )
    return path, results


def make_share(request, stages: Stages, team: Team, checked: dict, held: dict) -> list[SampleRecord]:
    """This rank's share of the samples and spectra; fills ``checked`` (indices per shape) and ``held``."""
    if request.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(request.device))  # so a bare "cuda" anywhere means it too
    files = pipeline.real_files(request)
    plans = {key: pipeline.plan_samples(key, request, files.get(key, [])) for key in request.shapes}
    units = work_units(plans, request)
    owners = assign_owners([u.cost for u in units], team.world)
    mine = [u for u, owner in zip(units, owners, strict=True) if owner == team.rank]
    checked |= {key: checked_indices(plan, request) for key, plan in plans.items()}
    return make_samples(mine, plans, request, stages, checked, held)


def work_units(plans: dict[ShapeKey, SamplePlan], request: CalibrationRequest) -> list[Unit]:
    """Every shape's sample work, costed in flops so ``assign_owners`` balances it."""
    units = []
    for key, plan in plans.items():
        spectrum = spectrum_flops(key)
        units += [Unit(key, "file", (i,), spectrum) for i in range(len(plan.files))]
        if plan.harvest:
            steps = resolve_steps(key, plan.harvest, request.harvest_steps, device=request.device)
            # Forward and backward of the two target matrices per token dominate a harvest step.
            training = steps * 6.0 * DEFAULT_TOKENS_PER_STEP * 2 * key[0] * key[1]
            indices = tuple(range(len(plan.files), plan.real))
            units.append(Unit(key, "harvest", indices, training + plan.harvest * spectrum))
        units += [Unit(key, "synthetic", (plan.real + j,), spectrum) for j in range(plan.synthetic)]
    return units


def spectrum_flops(key: ShapeKey) -> float:
    """The Gram matrix (2m²n) and its eigenvalues (~4m³) of an m×n sample, m ≤ n."""
    m, n = sorted(key)
    return 2.0 * m * m * n + 4.0 * m**3


def synthetic_at(key: ShapeKey, index: int, *, seed: int, families=None) -> Sample:
    """Synthetic sample ``index`` of ``synthetic_samples(key, count, seed=seed)``, for any count > index."""
    return synthetic_sample(key, index, seed=seed, family=family_at(index, families))


@dataclass(frozen=True)
class _Slot:
    index: int
    kind: str
    source: str  # what the split reads of a sample: a synthetic one's family (train_validation_split)


def checked_indices(plan: SamplePlan, request: CalibrationRequest) -> list[int]:
    """Indices of the matrix-checked samples: the split depends only on the kinds, counts, seed and the
    synthetic samples' families, all known from the plan."""
    slots = [_Slot(i, "real", "real") for i in range(plan.real)] + [
        _Slot(plan.real + j, "synthetic", synthetic_source(family_at(j, request.families)))
        for j in range(plan.synthetic)
    ]
    _, validation = train_validation_split(slots, request.validation_fraction, seed=request.seed)
    return [slot.index for slot in validation[: request.check_samples]]


def make_samples(
    units: list[Unit],
    plans: dict[ShapeKey, SamplePlan],
    request: CalibrationRequest,
    stages: Stages,
    checked: dict[ShapeKey, list[int]],
    held: dict[tuple[ShapeKey, int], Sample],
) -> list[SampleRecord]:
    """This rank's samples and spectra; keeps only the matrices its matrix check will need."""
    cache = SpectrumCache(request.cache_dir / "spectra" if request.cache_dir else None)
    records = []
    for key in plans:
        shape_units = [u for u in units if u.key == key]
        count = sum(len(u.indices) for u in shape_units)
        total = plans[key].real + plans[key].synthetic
        with stages.stage(f"{format_shape(key)} samples + spectra ({count} of {total})", count) as advance:
            for unit in shape_units:
                records += unit_records(unit, plans[key], request, stages, cache, checked[key], held)
                advance(len(unit.indices))
    return records


def unit_records(unit, plan, request, stages, cache, checked: list[int], held) -> list[SampleRecord]:
    started = time.perf_counter()
    samples = unit_samples(unit, plan, request, stages)
    reject_non_finite(samples)
    each = (time.perf_counter() - started) / len(samples)
    records = []
    for index, sample in zip(unit.indices, samples, strict=True):
        started = time.perf_counter()
        spectrum = pipeline.sample_spectrum(sample, request, cache)
        seconds = {"samples": each, "spectra": time.perf_counter() - started}
        records.append(
            SampleRecord(unit.key, index, sample.kind, sample.source, spectrum, seconds, sample.has_matrix)
        )
        if index in checked and sample.has_matrix:
            held[(unit.key, index)] = sample
    return records


def unit_samples(unit: Unit, plan: SamplePlan, request: CalibrationRequest, stages: Stages) -> list[Sample]:
    if unit.kind == "file":
        return [plan.files[unit.indices[0]]]
    if unit.kind == "harvest":
        return pipeline.harvest_stage(plan, request, stages)
    return [synthetic_at(unit.key, unit.indices[0] - plan.real, seed=request.seed, families=request.families)]


def fit_all(records: dict[ShapeKey, list[SampleRecord]], request: CalibrationRequest, stages: Stages):
    """Rank 0's fits, from the same calibration split and spectra as a single-process run."""
    fits = {}
    for key in request.shapes:
        calibration, validation = train_validation_split(
            records[key], request.validation_fraction, seed=request.seed
        )
        spectra = [r.spectrum for r in calibration]
        real = [r.spectrum for r in records[key] if r.kind == "real"]
        fits[key] = pipeline.fit_shape(
            key, spectra, request, stages, [r.spectrum for r in validation], real=real
        )
    return fits


def check_held(held, fits, request: CalibrationRequest, stages: Stages, team: Team):
    """The matrix check of the samples this rank made: {(shape, index): (errors, seconds)}."""
    out = {}
    with stages.stage(f"matrix check vs SVD (rank {team.rank})", len(held)) as advance:
        for (key, index), sample in sorted(held.items()):
            started = time.perf_counter()
            errors = pipeline.check_matrices(key, [sample.matrix], fits[key], request, advance)
            out[(key, index)] = (errors, time.perf_counter() - started)
    held.clear()  # the matrices are no longer needed; a big run frees them before writing
    return out


def shape_result(key, records: list[SampleRecord], fitted, checks, request) -> ShapeResult:
    matrix, check_seconds = checks
    if not matrix:  # recorded spectra only: no matrix was checked, as pipeline.check_matrices says it
        matrix = {label: {} for label in pipeline.check_schedules(key, fitted)}
    seconds = {
        stage: sum(r.seconds[stage] for r in records) for stage in ("samples", "spectra")
    }  # summed over ranks: compute time, not wall time
    seconds |= {"fit": fitted.seconds, "check": check_seconds}
    spectra = {id(r): r.spectrum for r in records}
    return pipeline.shape_result(key, fitted, request, records, spectra, matrix, seconds)


def _by_shape(records: list[SampleRecord]) -> dict[ShapeKey, list[SampleRecord]]:
    """Each shape's records in sample order, as the single-process run holds its samples."""
    shapes: dict[ShapeKey, list[SampleRecord]] = {}
    for record in sorted(records, key=lambda r: r.index):
        shapes.setdefault(record.key, []).append(record)
    return shapes


def _merge_checks(key: ShapeKey, order: list[int], gathered: list[dict]) -> tuple[dict, float]:
    """One shape's per-sample check results, from whichever rank ran them, in the checked order."""
    found = {k: v for rank_checks in gathered for k, v in rank_checks.items() if k[0] == key}
    merged: dict[str, dict[str, list[float]]] = {}
    for index in order:
        if (key, index) not in found:
            continue  # a recorded spectrum: no matrix to check (pipeline.matrix_checked)
        errors, _ = found[(key, index)]
        for label, by_dtype in errors.items():
            for dtype, values in by_dtype.items():
                merged.setdefault(label, {}).setdefault(dtype, []).extend(values)
    return merged, sum(seconds for _, seconds in found.values())
