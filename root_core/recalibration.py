"""Online recalibration: ROOT's side of refitting a table's rows on the spectra it records while training.

ROOT depends on torch only and never imports ``calibrate`` (docs/design.md §7), so the fit is injected:
a :class:`Recalibrator` is anything with ``submit(request) -> future``, where the future's ``result()``
returns a :class:`RecalibrationResult`. ``calibrate.fitting.online.OnlineRecalibrator`` is the implementation
(the CLI's fit, stress sets and baseline fallback, in a worker process); tests may pass their own.

What this module owns is the schedule, so that nothing depends on timing:

- every step, new spectra from the recorder move into a *staging* list;
- after step ``t`` with ``t % every == 0``, staging joins the per-shape *pool* (thinned evenly over the
  run, at most ``max_samples`` per shape) and a fit of the pool is submitted;
- after step ``t + lag`` its result is applied, waiting for it if it is not done: the rows used at any
  step depend on the step count, never on how fast the fit ran.

The pool changes only when a fit is launched and a launch comes after the previous apply (``lag <= every``),
so a fit in flight is a function of the pool, the table and its launch step. The state dict holds those,
the staging list and the table in use, so a resumed run re-submits the same fit and applies the same rows
at the same step, whatever is on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .tables import canonical_shape

# Spectra kept per shape for the fit. The fit's cost grows with samples × min(r, 512) points; 64 spread
# over the run keep every phase in it (docs/design.md §7).
DEFAULT_MAX_SAMPLES = 64
STATE_VERSION = 1

ShapeKey = tuple[int, int]


@dataclass(frozen=True)
class RecalibrationRequest:
    """What a recalibrator fits: the recorded spectra per canonical shape and the table now in use.

    ``spectra[shape]`` is a (samples × r) float64 tensor of normalised singular values (each row has unit
    Euclidean norm, as Newton–Schulz's Frobenius normalisation leaves them), in the order recorded;
    ``sources[shape]`` names each row (``"step 40: layers.0.mlp.up"``).
    """

    step: int  # the optimizer step after which the fit was launched
    table: dict[str, Any]  # the table in use, as CoefficientTable.to_dict()
    spectra: dict[ShapeKey, Tensor]
    sources: dict[ShapeKey, list[str]]
    clip_quantiles: list[float | None]  # the clip quantiles the spectra were recorded under
    missing_shape: str = "default"  # how the table resolves a shape it does not list (ROOT's setting)


@dataclass(frozen=True)
class RecalibrationResult:
    """The rows to use from the apply step on: ``table`` (a table dict) or ``None`` to keep the current one.

    ``path`` is where the new table version was written; ``report`` says per shape what was decided and
    why (errors on the recorded spectra), and lands in ``ROOT.recalibrations``.
    """

    table: dict[str, Any] | None
    path: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


class FutureLike(Protocol):
    def result(self) -> RecalibrationResult: ...


class Recalibrator(Protocol):
    """Fits rows on a request, off the training thread; ``concurrent.futures.Future`` is a ``FutureLike``."""

    def submit(self, request: RecalibrationRequest) -> FutureLike: ...


def check_recalibration_args(recalibrate: Any, every: Any, lag: Any) -> int | None:
    """Validate ROOT's ``recalibrate``/``recalibrate_every``/``recalibrate_lag``; return the lag to use."""
    if recalibrate is None and every is None:
        if lag is not None:
            raise ValueError(f"recalibrate_lag={lag!r} needs recalibrate= and recalibrate_every=")
        return None
    if recalibrate is None:
        raise ValueError(
            f"recalibrate_every={every!r} needs recalibrate=: the object that fits the rows, e.g. "
            "calibrate.fitting.online.OnlineRecalibrator()"
        )
    if not callable(getattr(recalibrate, "submit", None)):
        raise ValueError(
            f"recalibrate must have a submit(request) method returning a future, got "
            f"{type(recalibrate).__name__}; use calibrate.fitting.online.OnlineRecalibrator()"
        )
    if every is None:
        raise ValueError("recalibrate= needs recalibrate_every=K: refit every K steps")
    if not _is_positive_int(every):
        raise ValueError(f"recalibrate_every must be an integer >= 1, got {every!r}")
    if lag is None:
        return every
    if not _is_positive_int(lag) or lag > every:
        raise ValueError(
            f"recalibrate_lag must be an integer in [1, recalibrate_every={every}], got {lag!r} (a fit is "
            "applied before the next one starts)"
        )
    return lag


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class ShapePool:
    """One shape's spectra, thinned evenly over everything recorded: record ``i`` (counting every record of
    the shape) is kept while ``i % stride == 0``; when more than the cap are kept the stride doubles."""

    spectra: list[Tensor] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    seen: int = 0
    stride: int = 1

    def add(self, spectrum: Tensor, source: str, cap: int) -> None:
        index, self.seen = self.seen, self.seen + 1
        if index % self.stride:
            return
        self.spectra.append(spectrum)
        self.sources.append(source)
        self.indices.append(index)
        while len(self.spectra) > cap:
            self.stride *= 2
            keep = [k for k, i in enumerate(self.indices) if i % self.stride == 0]
            self.spectra = [self.spectra[k] for k in keep]
            self.sources = [self.sources[k] for k in keep]
            self.indices = [self.indices[k] for k in keep]

    def state_dict(self) -> dict[str, Any]:
        return {
            "spectra": list(self.spectra),
            "sources": list(self.sources),
            "indices": list(self.indices),
            "seen": self.seen,
            "stride": self.stride,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShapePool:
        return cls(
            spectra=list(state["spectra"]),
            sources=list(state["sources"]),
            indices=[int(i) for i in state["indices"]],
            seen=int(state["seen"]),
            stride=int(state["stride"]),
        )


def normalised_spectrum(singular_values: Tensor, shape: Sequence[int]) -> Tensor | None:
    """The recorded singular values divided by their Euclidean norm (= ‖B‖_F), in float64; ``None`` for
    a record that cannot be fitted on (a zero or non-finite update, or not one value per row of the short
    side)."""
    values = singular_values.detach().to("cpu", torch.float64).flatten()
    if values.numel() != min(shape) or not bool(torch.isfinite(values).all()):
        return None
    norm = float(values.norm())
    if not (norm > 0 and math.isfinite(norm)):
        return None
    return values / norm


class OnlineRecalibration:
    """ROOT's recalibration schedule (see the module docstring); ROOT calls :meth:`after_step` after
    every step and stores :meth:`state_dict` in its own."""

    def __init__(
        self,
        recalibrator: Recalibrator,
        *,
        every: int,
        lag: int,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        self.recalibrator = recalibrator
        self.every = every
        self.lag = lag
        self.max_samples = max_samples
        self.steps = 0
        self.last_recorded_step: int | None = None  # the newest recorder step moved into staging
        self.staging: list[tuple[ShapeKey, Tensor, str, float | None]] = []
        self.pools: dict[ShapeKey, ShapePool] = {}
        self.clip_quantiles: list[float | None] = []
        self.pending_step: int | None = None  # launch step of the fit in flight
        self.pending_table: dict[str, Any] | None = None  # the table that fit started from
        self.pending_missing: str = "default"
        self._future: FutureLike | None = None
        self.log: list[dict[str, Any]] = []
        self.pool_fitted = False  # a fit was launched on the pool as it is now

    def after_step(self, recorded: Sequence[Any], table: Any, missing_shape: str, apply: Callable) -> None:
        """One step has finished: stage new records, apply a fit due now (``apply(table_dict, path)``
        returns the table now in use), launch one. ``table`` is the ``CoefficientTable`` in use."""
        self.steps += 1
        self.stage(recorded)
        if self.pending_step is not None and self.steps == self.pending_step + self.lag:
            result = self._wait()
            entry = {"launched": self.pending_step, "applied": self.steps, "path": result.path}
            entry["swapped"] = result.table is not None
            entry["report"] = result.report
            self.log.append(entry)
            self.pending_step = self.pending_table = None
            if result.table is not None:
                table = apply(result.table, result.path)
        if self.steps % self.every == 0:
            self.launch(table, missing_shape)

    def stage(self, recorded: Sequence[Any]) -> None:
        """Move records newer than the last staged step into staging (records of one step arrive together)."""
        newest = self.last_recorded_step
        for record in recorded:
            if self.last_recorded_step is not None and record.step <= self.last_recorded_step:
                continue
            shape = canonical_shape(record.shape)
            spectrum = normalised_spectrum(record.singular_values, shape)
            if spectrum is not None:
                self.staging.append(
                    (shape, spectrum, f"step {record.step}: {record.name}", record.clip_quantile)
                )
            newest = record.step if newest is None else max(newest, record.step)
        self.last_recorded_step = newest

    def launch(self, table: Any, missing_shape: str) -> None:
        if not self.staging and self.pool_fitted:
            return  # nothing recorded since the last fit (record_every > every): it would say the same
        for shape, spectrum, source, quantile in self.staging:
            self.pools.setdefault(shape, ShapePool()).add(spectrum, source, self.max_samples)
            if quantile not in self.clip_quantiles:
                self.clip_quantiles.append(quantile)
        self.staging = []
        if not self.pools:
            return  # nothing recorded yet: no fit, the rows stay
        self.pool_fitted = True
        self.pending_step, self.pending_table, self.pending_missing = (
            self.steps,
            table.to_dict(),
            missing_shape,
        )
        self._submit()

    def _submit(self) -> None:
        assert self.pending_step is not None and self.pending_table is not None
        shapes = sorted(self.pools)
        self._future = self.recalibrator.submit(
            RecalibrationRequest(
                step=self.pending_step,
                table=self.pending_table,
                spectra={s: torch.stack(self.pools[s].spectra) for s in shapes},
                sources={s: list(self.pools[s].sources) for s in shapes},
                clip_quantiles=list(self.clip_quantiles),
                missing_shape=self.pending_missing,
            )
        )

    def _wait(self) -> RecalibrationResult:
        future, self._future = self._future, None
        if future is None:  # restored from a state dict and not re-submitted (cannot happen: load submits)
            raise RuntimeError("online recalibration lost the fit it launched")
        try:
            result = future.result()
        except Exception as error:  # a worker that died, or a bug: say which fit, keep the cause
            raise RuntimeError(
                f"online recalibration launched after step {self.pending_step} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(result, RecalibrationResult):
            raise TypeError(
                f"recalibrate's future returned {type(result).__name__}, not a RecalibrationResult"
            )
        return result

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "last_recorded_step": self.last_recorded_step,
            "staging": [
                {"shape": list(s), "spectrum": x, "source": src, "clip_quantile": q}
                for s, x, src, q in self.staging
            ],
            "pools": [
                {"shape": list(shape), **pool.state_dict()} for shape, pool in sorted(self.pools.items())
            ],
            "clip_quantiles": list(self.clip_quantiles),
            "pending_step": self.pending_step,
            "pending_table": self.pending_table,
            "pending_missing": self.pending_missing,
            "log": list(self.log),
            "pool_fitted": self.pool_fitted,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the schedule; a fit in flight at save time is submitted again (same inputs, same rows)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown online recalibration state version {state.get('version')!r}")
        self.steps = int(state["steps"])
        self.last_recorded_step = state["last_recorded_step"]
        self.staging = [
            (tuple(item["shape"]), item["spectrum"], item["source"], item["clip_quantile"])
            for item in state["staging"]
        ]
        self.pools = {tuple(item["shape"]): ShapePool.from_state(item) for item in state["pools"]}
        self.clip_quantiles = list(state["clip_quantiles"])
        self.pending_step = state["pending_step"]
        self.pending_table = state["pending_table"]
        self.pending_missing = state["pending_missing"]
        self.log = list(state["log"])
        self.pool_fitted = bool(state["pool_fitted"])
        self._future = None
        if self.pending_step is not None:
            self._submit()
