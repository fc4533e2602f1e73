"""The ROOT optimizer: Muon with per-shape Newton–Schulz tables and soft-thresholded momentum.

Per matrix parameter and step (He et al. 2025, arXiv 2511.20626, with ``torch.optim.Muon``'s momentum):
momentum, Nesterov, clip the update to ±(its ``outlier_quantile`` of |·|), orthogonalise with the
table's schedule for the parameter's shape, decoupled weight decay, shape-adjusted lr. Parameters that
are not matrices, and those a group marks ``use_root=False`` (embeddings, LM heads), get AdamW.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from .distributed import (
    check_data_parallel,
    check_row_sharded,
    is_dtensor,
    local_tensor,
    orthogonalize_replicated,
    orthogonalize_sharded,
    resolve_data_parallel,
)
from .newton_schulz import NS_FORMS, default_ns_dtype, orthogonalize
from .outliers import DEFAULT_OUTLIER_QUANTILE, clip_to_quantile
from .param_groups import root_param_groups
from .recalibration import OnlineRecalibration, check_recalibration_args
from .recording import DEFAULT_RECORD_EVERY, MomentumRecorder
from .schedule import DEFAULT_EPS, Schedule
from .spectral import ROUNDING_MARGIN, composition_range
from .tables import MISSING_POLICIES, CoefficientTable, TableEntry, TableError, load_table

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ROOT", "root_param_groups"]

# torch.optim.Muon's defaults (torch 2.13), so ROOT is a drop-in with the same meaning for each name.
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_MOMENTUM = 0.95
# Common AdamW settings for the non-matrix parameters of LLM training (Moonlight, modded-nanogpt).
DEFAULT_ADAMW_BETAS = (0.9, 0.95)
DEFAULT_ADAMW_EPS = 1e-8
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
MAX_NS_STEPS = 100  # as torch.optim.Muon: more steps is a mistake, not a setting
NS_FORM_CHOICES = (None, *NS_FORMS)  # None: the table entry's form, else "standard"
# Each param group names the table its state belongs to, as plain strings: torch.distributed.checkpoint's
# get_optimizer_state_dict keeps param-group keys but drops any other top-level key of state_dict().
GROUP_TABLE_KEY = "root_table"  # "name@version", for messages
GROUP_TABLE_HASH_KEY = "root_table_hash"  # the table's coefficients_hash: what a resume checks
# Where checkpoints written before the identity moved into the groups kept it (a dict: table.ref).
LEGACY_STATE_TABLE_KEY = "root_table"
# The recorder's step count in state_dict(), so a resumed run records on the same steps (a top-level key:
# torch.distributed.checkpoint drops it, and such a resume counts recorded steps from 0 again).
RECORDER_STATE_KEY = "root_recorder"
# With online recalibration, the table in use and the refit schedule (root_core/recalibration.py). A
# top-level key, so torch.distributed.checkpoint drops it; a resume from there names the table on disk.
RECALIBRATION_STATE_KEY = "root_recalibration"
# Same-shape matrices are clipped and orthogonalised together, up to this many elements per batch (one
# 4096×4096 matrix): batching pays where matrices are small and per-call overhead dominates, while a
# stack of large ones only multiplies the step's workspace (a 7B model holds 128 q/k/v/o matrices).
BATCH_ELEMENTS = 4096 * 4096


class ROOT(torch.optim.Optimizer):
    """ROOT: a drop-in for ``torch.optim.Muon`` that loads Newton–Schulz coefficients per shape.

    Args follow ``torch.optim.Muon`` (``lr``, a float or 1-element tensor, ``weight_decay``, ``momentum``,
    ``nesterov``, ``ns_coefficients``, ``eps``, ``ns_steps``, ``adjust_lr_fn``), plus:
        table: a coefficient table or anything :func:`load_table` takes (``"muon"``, ``"root-paper@1"``,
            a path, a dict); default ``"muon"``. Looked up once per parameter shape, at construction.
        ns_coefficients: ``torch.optim.Muon``'s name for one ``(a, b, c)`` row used at every shape: a
            one-row table (Muon's eps, scale 1). Give it or ``table``, not both.
        eps: the floor of the normaliser, X = G / max(scale·‖G‖_F, eps), as ``torch.optim.Muon``'s
            ``clamp(min=eps)``; ``None`` (default) takes the table's ``normalization.eps``, a number
            overrides it for this optimizer.
        outlier_quantile: quantile of |update| at which the update is clipped before NS (ROOT's
            soft-threshold); ``None`` switches it off.
        ns_steps: steps per NS call; ``None`` runs the table's own count.
        ns_dtype: NS iteration dtype; ``None`` is bf16 on CUDA (fp16 for the Gram form), float32 on CPU.
        ns_form: ``"standard"`` (iterate on X, as Muon), ``"gram"`` (on the m×m Gram matrix with restarts:
            fewer flops when one side is over 1.5× the other, see :func:`gram_newton_schulz`) or ``None``
            (default): the table entry's ``form`` for the shape, else ``"standard"``.
        missing_shape: ``"default"``, ``"error"`` or ``"nearest"`` for shapes the table does not list.
        adamw_betas, adamw_eps: AdamW settings for groups with ``use_root=False`` and for parameters
            that are not matrices (a group's ``use_root=None`` decides per parameter by ``ndim``).
        data_parallel: whether plain (replicated, DDP) parameters share the NS work across ranks:
            ``True`` splits it over the default group, a ``ProcessGroup`` over that group; ``None`` (the
            default; warns once in a job of several ranks) and ``False`` never split, so each rank steps
            its own parameters, as pipeline or tensor parallel ranks must. FSDP2's DTensor parameters are
            always handled across their mesh. See :mod:`root_core.distributed`.
        record_dir, record_every, record_matrices: record what Newton–Schulz receives on steps 1,
            N + 1, 2N + 1, … (N = ``record_every``) into ``record_dir``: each ROOT-routed matrix's float64
            spectrum, and the whole update of the parameters matched by ``record_matrices`` (``fnmatch``
            patterns). See :mod:`root_core.recording`; ``root-calibrate --real record_dir`` calibrates on
            it. Names come from named parameters (``model.named_parameters()``, or ``(name, p)`` pairs in
            a group), else ``group{g}.param{i}``.
        recorder: a :class:`~root_core.recording.MomentumRecorder`, instead of ``record_dir``; either way
            it is ``opt.recorder`` (``None`` when not recording). With recording on, the step is not one
            graph for ``torch.compile(fullgraph=True)``: the recorder counts steps and writes files, so
            it runs eagerly and plain ``torch.compile`` breaks the graph around it.
        recalibrate, recalibrate_every, recalibrate_lag: online recalibration (needs recording). After
            every ``recalibrate_every``-th step the spectra recorded so far go to ``recalibrate.submit``
            (``calibrate.fitting.online.OnlineRecalibrator``: the CLI's fit, in a worker process); its answer
            is applied after exactly ``recalibrate_lag`` (default ``recalibrate_every``) more steps, waiting
            for it if needed, so the rows never depend on timing. ``opt.recalibrations`` logs each refit;
            ``state_dict()`` carries the table in use. See :mod:`root_core.recalibration`.

    Example::

        groups = root_param_groups(model, adamw_lr=3e-4)
        opt = ROOT(groups, lr=0.02, table="root-paper", adjust_lr_fn="match_rms_adamw")
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULT_LR,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        momentum: float = DEFAULT_MOMENTUM,
        nesterov: bool = True,
        *,
        table: Any = None,
        ns_coefficients: tuple[float, float, float] | None = None,
        outlier_quantile: float | None = DEFAULT_OUTLIER_QUANTILE,
        eps: float | None = None,
        ns_steps: int | None = None,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype | str | None = None,
        ns_form: str | None = None,
        missing_shape: str = "default",
        adamw_betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
        adamw_eps: float = DEFAULT_ADAMW_EPS,
        data_parallel: bool | ProcessGroup | None = None,
        record_dir: str | os.PathLike | None = None,
        record_every: int = DEFAULT_RECORD_EVERY,
        record_matrices: Iterable[str] = (),
        recorder: MomentumRecorder | None = None,
        recalibrate: Any = None,
        recalibrate_every: int | None = None,
        recalibrate_lag: int | None = None,
    ) -> None:
        recalibrate_lag = check_recalibration_args(recalibrate, recalibrate_every, recalibrate_lag)
        if missing_shape not in MISSING_POLICIES:
            raise ValueError(f"missing_shape must be one of {MISSING_POLICIES}, got {missing_shape!r}")
        check_data_parallel(data_parallel)
        self.data_parallel = data_parallel
        _check_lr(lr)  # first, as torch.optim.Muon does, so its error inputs get its message
        self.table: CoefficientTable = load_table(_table_spec(table, ns_coefficients))
        self.missing_shape = missing_shape
        self._schedules: dict[tuple[tuple[int, int], int | None], Schedule] = {}
        self._forms: dict[tuple[int, int], str] = {}  # canonical shape → the table entry's NS form
        self._layouts: dict[int, GroupLayout] = {}  # per param group index, built in add_param_group
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            outlier_quantile=outlier_quantile,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=_dtype_name(ns_dtype),
            ns_form=ns_form,
            use_root=None,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )
        _validate_group(defaults)
        # Before the groups are added: add_param_group names each parameter for the recordings.
        self.recorder = _recorder(record_dir, record_every, record_matrices, recorder)
        self._param_names: dict[int, str] = {}  # id(parameter) → its name in recordings
        super().__init__(params, defaults)
        if self.recorder is not None:  # the recorder's step count rides in state_dict()
            self.register_state_dict_post_hook(_save_recorder_step)
            self.register_load_state_dict_pre_hook(_load_recorder_step)
        self._online = self._online_recalibration(recalibrate, recalibrate_every, recalibrate_lag)
        self._table_from_state = False  # the table came from a recalibrated run's state dict

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "ns_coefficients" in param_group:
            raise ValueError(
                "ns_coefficients is a ROOT constructor argument (it defines the table for all groups), "
                "not a per-group setting; pass a table with per-shape rows instead"
            )
        if "ns_dtype" in param_group:
            param_group["ns_dtype"] = _dtype_name(param_group["ns_dtype"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._name_parameters(len(self.param_groups) - 1, group)
        group.update(self._table_keys())
        _validate_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    f"ROOT does not support complex parameters, got a {p.dtype} parameter of shape "
                    f"{tuple(p.shape)}; optimise torch.view_as_real(p) instead, or use another optimizer"
                )
            if _routes_to_root(group, p):
                self._schedule_for(p, group["ns_steps"])  # fail (or warn) now, not mid-training
                self._form_for_shape(_matrix_shape(p))  # looked up here, so the step only reads a dict
        self._layouts[len(self.param_groups) - 1] = group_layout(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("data_parallel", None)  # pickled before the setting existed
        self.__dict__.setdefault("_forms", {})  # pickled before per-entry NS forms existed
        self.__dict__.setdefault("recorder", None)  # pickled before recording existed
        self._param_names = {}
        for index, group in enumerate(self.param_groups):
            self._name_parameters(index, group)
        self.__dict__.setdefault("_online", None)  # pickled before online recalibration existed
        self.__dict__.setdefault("_table_from_state", False)
        # Checkpoints written before a group key existed still load, with that key's default. The table
        # keys name this optimizer's table: load_state_dict has checked that the saved one has its numbers.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.update(self._table_keys())
        self._layouts = {index: group_layout(group) for index, group in enumerate(self.param_groups)}

    def _name_parameters(self, index: int, group: dict[str, Any]) -> None:
        """Each parameter's name in recordings: torch's ``param_names``, else ``group{g}.param{i}``."""
        names = group.get("param_names") or [f"group{index}.param{i}" for i in range(len(group["params"]))]
        self._param_names.update((id(p), name) for p, name in zip(group["params"], names, strict=True))

    def _table_keys(self) -> dict[str, str]:
        return {
            GROUP_TABLE_KEY: f"{self.table.name}@{self.table.version}",
            GROUP_TABLE_HASH_KEY: self.table.coefficients_hash,
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus (with online recalibration) the table in use and the schedule."""
        state = super().state_dict()
        if self._online is not None or self._table_from_state:
            online = self._online.state_dict() if self._online is not None else {}
            state[RECALIBRATION_STATE_KEY] = {"table": self.table.to_dict(), **online}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse state saved with other coefficients; the table's name, metrics and provenance may differ.

        State saved with online recalibration carries its table: this optimizer continues with exactly
        those rows (and, if it recalibrates too, with the same schedule and the fit that was in flight).
        """
        state_dict = dict(state_dict)
        legacy = state_dict.pop(LEGACY_STATE_TABLE_KEY, None)
        online = state_dict.pop(RECALIBRATION_STATE_KEY, None)
        if online is not None:
            self._use_table(CoefficientTable.from_dict(online["table"], source="<optimizer state>"))
            self._table_from_state = True  # carried on into this optimizer's own checkpoints
            if self._online is not None:
                self._online.load_state_dict({k: v for k, v in online.items() if k != "table"})
        check_table_identity(self.table, state_dict.get("param_groups", []), legacy)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in every torch optimizer).

        Same-shape matrices step as one batch (see :func:`group_layout`). Nothing in it syncs with the
        host or branches on tensor values, so ``torch.compile(opt.step, fullgraph=True)`` traces it whole
        (pass a tensor ``lr`` there, so that a scheduler changing it does not recompile).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        recording = self.recorder is not None and self.recorder.begin_step()
        for index, group in enumerate(self.param_groups):
            layout = self._layout_of(index, group)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("ROOT does not support sparse gradients")
            self._root_updates(layout, group, recording)
            adamw_params = [p for p in layout.adamw if p.grad is not None]
            if adamw_params:
                self._adamw_update(adamw_params, group)
        if recording:
            self.recorder.end_step()
        if self._online is not None:  # a step boundary: rows change only here (root_core/recalibration.py)
            recorded = self.recorder.spectra() if recording else ()  # a list copy: only when it grew
            self._online.after_step(recorded, self.table, self.missing_shape, self._apply_recalibration)
        return loss

    @property
    def recalibrations(self) -> list[dict[str, Any]]:
        """Each online refit applied so far: launch and apply steps, whether rows changed, the new table's
        path and, per shape, the decision and the errors on held-out recorded spectra."""
        return [] if self._online is None else list(self._online.log)

    def _online_recalibration(self, recalibrate: Any, every: int | None, lag: int | None):
        if recalibrate is None:
            return None
        if getattr(self, "recorder", None) is None:
            raise ValueError(
                f"recalibrate_every={every} refits on recorded spectra, but this ROOT records none: pass "
                "record_dir= (and record_every=) or recorder="
            )
        if _world_size() > 1:
            raise ValueError(
                "online recalibration runs in single-process training only: ranks would refit on different "
                "spectra and train with different rows; calibrate offline from the recordings instead"
            )
        return OnlineRecalibration(recalibrate, every=every, lag=lag)

    def _apply_recalibration(self, table: dict[str, Any], path: str | None) -> CoefficientTable:
        self._use_table(CoefficientTable.from_dict(table, source=path or "<recalibration>"))
        return self.table

    def _use_table(self, table: CoefficientTable) -> None:
        """Run ``table`` from the next step on: its schedules and forms resolved now, not in the step."""
        cached = list(self._schedules)
        forms = list(self._forms)
        self.table = table
        self._schedules, self._forms = {}, {}
        for shape, ns_steps in cached:
            self._schedule_for_shape(shape, ns_steps)
        for shape in forms:
            self._form_for_shape(shape)
        for group in self.param_groups:
            group.update(self._table_keys())

    def _layout_of(self, index: int, group: dict[str, Any]) -> GroupLayout:
        """The group's layout from construction; rebuilt only if its parameter list was replaced."""
        layout = self._layouts.get(index)
        if layout is None or layout.params is not group["params"] or layout.count != len(group["params"]):
            layout = self._layouts[index] = group_layout(group)
        return layout

    def _root_updates(self, layout: GroupLayout, group: dict[str, Any], recording: bool = False) -> None:
        """Step one group's matrices: in same-shape batches, or with the NS work shared across ranks.

        ``recording``: NS inputs go to the recorder, on the rank that orthogonalises each matrix.
        """
        sharded = [p for p in layout.sharded if p.grad is not None]
        replicated = [p for p in layout.replicated if p.grad is not None]
        process_group = resolve_data_parallel(self.data_parallel) if replicated else None
        if process_group is None:
            for batch in layout.batches:
                ready = [p for p in batch if p.grad is not None]
                if ready:
                    self._batch_update(ready, group, recording)
        elif replicated:
            updates = [self._momentum_update(p, group) for p in replicated]
            directions = orthogonalize_replicated(
                updates, self._directions_of(replicated, group, recording), group=process_group
            )
            self._apply_updates(replicated, directions, group)
        if sharded:
            check_row_sharded(sharded)
            updates = [self._momentum_update(p, group) for p in sharded]
            directions_of = self._directions_of(sharded, group, recording)
            directions = orthogonalize_sharded(sharded, updates, directions_of)
            self._apply_updates(sharded, directions, group)

    def _directions_of(self, params: list[Tensor], group: dict[str, Any], recording: bool):
        """The batch function the distributed split calls with the indices (into ``params``) of a batch."""
        return lambda batch, indices: self._directions(batch, group, self._names(params, indices, recording))

    def _names(self, params: list[Tensor], indices, recording: bool) -> list[str] | None:
        """The recorded names of ``params[i]`` for ``i`` in ``indices``; None when not recording."""
        return [self._param_names[id(params[i])] for i in indices] if recording else None

    def _batch_update(self, params: list[Tensor], group: dict[str, Any], recording: bool = False) -> None:
        """Step matrices of one shape: one clip and one NS call for all (a lone matrix is not stacked)."""
        updates = [self._momentum_update(p, group) for p in params]
        names = self._names(params, range(len(params)), recording)
        if len(updates) == 1:
            directions = [self._directions(updates[0], group, names)]
        else:
            directions = list(self._directions(torch.stack(updates), group, names).unbind(0))
        self._apply_updates(params, directions, group)

    def _momentum_update(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """Step the momentum buffer; return the (Nesterov) update as a matrix of this rank's rows."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            # Contiguous, so a conv kernel's buffer can be viewed as its (out, in·∏k) matrix in place.
            # A DTensor parameter gets a DTensor buffer with its placement: the state stays sharded.
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        buffer = local_tensor(state["momentum_buffer"])
        local_shape = (buffer.shape[0], _matrix_shape(p)[1])
        return momentum_update(
            local_tensor(p.grad).reshape(local_shape),
            buffer.view(local_shape),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
        )

    def _directions(self, update: Tensor, group: dict[str, Any], names: list[str] | None = None) -> Tensor:
        """Clip and orthogonalise a whole matrix, or a (b, m, n) batch of same-shape matrices.

        With ``names`` (a recorded step) the clipped update B goes to the recorder before NS: the clip and
        the NS call of :func:`clipped_direction`, in two calls, so the result has the same bits.
        """
        eps = self.table.normalization.eps if group["eps"] is None else group["eps"]
        shape = tuple(update.shape[-2:])
        form = group.get("ns_form") or self._form_for_shape(shape)  # .get: older checkpoints
        quantile = group["outlier_quantile"]
        if names is not None:
            clipped = update if quantile is None else clip_to_quantile(update, quantile)
            self.recorder.observe(
                names,
                update,
                clipped,
                clip_quantile=quantile,
                table=f"{self.table.name}@{self.table.version}",
                table_hash=self.table.coefficients_hash,
            )
            update, quantile = clipped, None
        return clipped_direction(
            update,
            self._schedule_for_shape(shape, group["ns_steps"]),
            outlier_quantile=quantile,
            eps=eps,
            ns_dtype=_dtype_from_name(group["ns_dtype"]) or default_ns_dtype(update.device, form),
            form=form,
        )

    def _apply_updates(self, params: list[Tensor], directions: list[Tensor], group: dict[str, Any]) -> None:
        """Weight decay and the step, on each rank's own rows (a DTensor's local shard)."""
        lr = _lr(group["lr"])  # a tensor lr stays a tensor, as in torch.optim.Muon: no host sync
        for p, direction in zip(params, directions, strict=True):
            local = local_tensor(p)
            local.mul_(1 - lr * group["weight_decay"])
            alpha = -adjusted_lr(lr, group["adjust_lr_fn"], _matrix_shape(p))
            local.add_(direction.view_as(local), alpha=alpha)

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # As torch.optim.AdamW keeps it: a float32 tensor, so its state loads into AdamW too.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["adamw_betas"]
        adam(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=_lr(group["lr"]),
            weight_decay=group["weight_decay"],
            eps=group["adamw_eps"],
            maximize=False,
        )

    def _form_for_shape(self, shape: tuple[int, int]) -> str:
        key = (min(shape), max(shape))
        if key not in self._forms:
            self._forms[key] = _entry_form(self.table.entry(shape))
        return self._forms[key]

    def _schedule_for(self, p: Tensor, ns_steps: int | None) -> Schedule:
        return self._schedule_for_shape(_matrix_shape(p), ns_steps)

    def _schedule_for_shape(self, shape: tuple[int, int], ns_steps: int | None) -> Schedule:
        key = ((min(shape), max(shape)), ns_steps)
        if key not in self._schedules:
            schedule = self.table.schedule_for(shape, missing=self.missing_shape).with_steps(ns_steps)
            warn_if_fragile(schedule, key[0], self.table.name, self.table.version)
            self._schedules[key] = schedule
        return self._schedules[key]


# The bundled baselines' provenance notes once cited a design document outside the repository; re-pointing
# them at docs/design.md changed their content hash, not a single coefficient. Checkpoints written before
# coefficients_hash carry only the old content hash: map it to the (unchanged) coefficients hash.
FORMER_BUNDLED_CONTENT_HASHES = {
    # muon@1
    "sha256:9fae7e12153b5c7f09df10d395429baefa4f46585dab7aafbba4f5b3b14b18f6": (
        "sha256:2cea30f45bfac55242c8d9927c429afaccb892085b7dd1c3d7ce1d44d1d0b797"
    ),
    # polar-express@1
    "sha256:f805fda22f4bfc8c9e46ab96ce4bee60dda712b03f2aae12635929d9a557a66e": (
        "sha256:3066362d1e7b4622f8d9a9fc9065e0ddb92ed81536b5adb1739b30314efb08d1"
    ),
    # root-paper@1
    "sha256:b0accf50936696ffd9f090e1e52419c9cc83e2d5ceedb187cfdea47e139d409b": (
        "sha256:eaddbd230c7eff70f118ca7d59b82ba6df4d43604abcf61265897ce8bdb31957"
    ),
}


def _recorder(
    record_dir: Any, record_every: int, record_matrices: Iterable[str], recorder: MomentumRecorder | None
) -> MomentumRecorder | None:
    """The recorder ROOT hands NS inputs to: the one given, a new one for ``record_dir``, or None."""
    if recorder is not None:
        if record_dir is not None:
            raise ValueError("pass record_dir= or recorder=, not both")
        if not isinstance(recorder, MomentumRecorder):
            raise ValueError(f"recorder must be a root_core.recording.MomentumRecorder, got {recorder!r}")
        return recorder
    if record_dir is None:
        return None
    return MomentumRecorder(record_dir, every=record_every, matrices=record_matrices)


def _save_recorder_step(optimizer: ROOT, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict[RECORDER_STATE_KEY] = optimizer.recorder.state_dict()
    return state_dict


def _load_recorder_step(optimizer: ROOT, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = dict(state_dict)
    saved = state_dict.pop(RECORDER_STATE_KEY, None)
    if saved is not None and optimizer.recorder is not None:
        optimizer.recorder.load_state_dict(saved)
    return state_dict


def check_table_identity(table: CoefficientTable, saved_groups: list[dict[str, Any]], legacy: Any) -> None:
    """Raise ValueError when saved param groups (or an old checkpoint's top-level ref) name a table whose
    coefficients differ from ``table``'s; say which rows differ when the saved table can still be loaded."""
    saved = {(g[GROUP_TABLE_KEY], g[GROUP_TABLE_HASH_KEY]) for g in saved_groups if GROUP_TABLE_HASH_KEY in g}
    if not saved and isinstance(legacy, dict) and legacy.get("content_hash") != table.content_hash:
        # Before coefficients_hash, checkpoints carried the content hash only; the named table, if it is
        # still there with that content (or was a bundled table whose note changed since), tells its
        # coefficients.
        spec = f"{legacy.get('name')}@{legacy.get('version')}"
        found = _saved_table(spec)
        same_file = found is not None and found.content_hash == legacy.get("content_hash")
        former = FORMER_BUNDLED_CONTENT_HASHES.get(legacy.get("content_hash"))
        saved = {(spec, found.coefficients_hash if same_file else former or "unknown")}
    for spec, coefficients_hash in sorted(saved):
        if coefficients_hash == table.coefficients_hash:
            continue
        found = _saved_table(spec)
        if found is not None and found.coefficients_hash == coefficients_hash:
            what = "rows differ for " + ", ".join(table.rows_differing_from(found))
        else:
            what = f"the coefficients differ (no '{spec}' with those numbers on the search path to say where)"
        raise ValueError(
            f"optimizer state was saved with table '{spec}' ({coefficients_hash[:15]}…), but this ROOT uses "
            f"'{table.name}@{table.version}' ({table.coefficients_hash[:15]}…): {what}; construct ROOT "
            f'with table="{spec}" to resume it'
        )


def _saved_table(spec: str) -> CoefficientTable | None:
    try:
        return load_table(spec)
    except (TableError, TypeError):
        return None


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


class FragileScheduleWarning(UserWarning):
    """A table's rows blow up when rounding pushes singular values slightly above 1."""


# Above this, the composed polynomial under ROUNDING_MARGIN is not a bounded update any more: Muon's rows
# reach 1.20 and Polar Express's 1.21 there, fragile fits 1e12 and more.
FRAGILE_GAIN = 2.0


def warn_if_fragile(schedule: Schedule, shape: tuple[int, int], table: str, version: int) -> None:
    """Warn once per shape when low-precision rounding could make these rows diverge."""
    _, high = composition_range(schedule, margin=ROUNDING_MARGIN)
    if high > FRAGILE_GAIN:
        warnings.warn(
            f"table '{table}@{version}' rows for {shape[0]}x{shape[1]} reach P = {high:.3g} when rounding "
            f"pushes σ {ROUNDING_MARGIN:.0%} above 1; they may diverge in bf16 (refit with root-calibrate, "
            "or use ns_dtype=torch.float32)",
            FragileScheduleWarning,
            stacklevel=4,
        )


def root_direction(
    grad: Tensor,
    momentum_buffer: Tensor,
    schedule: Schedule,
    *,
    momentum: float,
    nesterov: bool,
    outlier_quantile: float | None,
    eps: float,
    ns_dtype: torch.dtype,
) -> Tensor:
    """ROOT's functional core for one matrix: update ``momentum_buffer`` in place, return NS(B).

    Momentum is ``torch.optim.Muon``'s EMA (buf ← μ·buf + (1−μ)·g; Nesterov g ← (1−μ)·g + μ·buf).
    It is (1−μ) times the ROOT reference's buf ← μ·buf + g, a factor that neither the quantile clip
    nor the Frobenius normalisation sees, so both give the same direction.
    """
    update = momentum_update(grad, momentum_buffer, momentum=momentum, nesterov=nesterov)
    return clipped_direction(update, schedule, outlier_quantile=outlier_quantile, eps=eps, ns_dtype=ns_dtype)


def momentum_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float, nesterov: bool) -> Tensor:
    """The elementwise half of :func:`root_direction`: it needs no whole matrix, so shards do it alone."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def clipped_direction(
    update: Tensor,
    schedule: Schedule,
    *,
    outlier_quantile: float | None,
    eps: float,
    ns_dtype: torch.dtype,
    form: str = "standard",
) -> Tensor:
    """The whole-matrix half of :func:`root_direction`, matrix by matrix over any batch dimensions."""
    if outlier_quantile is not None:
        update = clip_to_quantile(update, outlier_quantile)
    return orthogonalize(update, schedule, eps=eps, dtype=ns_dtype, form=form)


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, shape: tuple[int, int]) -> float | Tensor:
    """``torch.optim.Muon``'s rule: "original" (Keller Jordan) or "match_rms_adamw" (Moonlight).

    The ratio is formed first and lr multiplied once, in Muon's order, so a tensor lr rounds as Muon's.
    """
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1.0, rows / cols))


@dataclass(frozen=True)
class GroupLayout:
    """A param group's parameters by route, fixed at construction so the step does no sorting of its own."""

    params: list[Tensor]  # the group's own list, to notice when it is replaced
    count: int
    adamw: tuple[Tensor, ...]
    replicated: tuple[Tensor, ...]  # plain matrices, in group order (the order every DDP rank shares)
    sharded: tuple[Tensor, ...]  # DTensor matrices (FSDP2)
    batches: tuple[tuple[Tensor, ...], ...]  # ``replicated`` by shape, dtype and device


def group_layout(group: dict[str, Any], max_elements: int | None = None) -> GroupLayout:
    """Route a group's parameters and batch its plain matrices by matrix shape, dtype and device.

    Batches keep the order of first appearance and hold at most ``max_elements`` (default
    :data:`BATCH_ELEMENTS`) elements, but always one matrix. Tall and wide matrices of one shape batch
    apart: stacked transposed, a matrix would reach the norm and the matmuls in another memory order,
    which can change its bits (untested), and bit-identity with ``torch.optim.Muon`` is the contract.
    """
    budget = BATCH_ELEMENTS if max_elements is None else max_elements
    adamw, replicated, sharded = [], [], []
    for p in group["params"]:
        if not _routes_to_root(group, p):
            adamw.append(p)
        else:
            (sharded if is_dtensor(p) else replicated).append(p)
    same_shape: dict[tuple[Any, ...], list[Tensor]] = {}
    for p in replicated:
        same_shape.setdefault((_matrix_shape(p), p.dtype, p.device), []).append(p)
    batches = []
    for ((rows, cols), _, _), members in same_shape.items():
        size = max(1, budget // max(1, rows * cols))
        batches.extend(tuple(members[start : start + size]) for start in range(0, len(members), size))
    return GroupLayout(
        params=group["params"],
        count=len(group["params"]),
        adamw=tuple(adamw),
        replicated=tuple(replicated),
        sharded=tuple(sharded),
        batches=tuple(batches),
    )


def _routes_to_root(group: dict[str, Any], p: Tensor) -> bool:
    if group["use_root"] is None:
        return p.ndim >= 2
    if group["use_root"] and p.ndim < 2:
        raise ValueError(
            f"a use_root=True group holds a parameter of shape {tuple(p.shape)}; ROOT needs "
            "matrices (put it in a use_root=False group, or use root_param_groups)"
        )
    return bool(group["use_root"])


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    """Conv kernels (out, in, *k) are orthogonalised as (out, in·∏k), the usual Muon convention."""
    return (p.shape[0], p.numel() // p.shape[0]) if p.shape[0] else (0, 0)


def _table_spec(table: Any, ns_coefficients: Any) -> Any:
    """What to load: ``table``, else a one-row table of torch.optim.Muon's ``ns_coefficients``, else muon."""
    if ns_coefficients is None:
        return "muon" if table is None else table
    if table is not None:
        raise ValueError(
            "pass table= or ns_coefficients=, not both: ns_coefficients is torch.optim.Muon's name for a "
            f"one-row table, got table={table!r} and ns_coefficients={ns_coefficients!r}"
        )
    try:
        row = tuple(float(value) for value in ns_coefficients)
    except (TypeError, ValueError):
        row = ()
    if len(row) != 3 or not all(math.isfinite(value) for value in row):
        raise ValueError(f"ns_coefficients must be three finite numbers (a, b, c), got {ns_coefficients!r}")
    return CoefficientTable.create(
        name="ns-coefficients",
        default_rows=row,
        eps=DEFAULT_EPS,  # torch.optim.Muon's
        provenance={"source": "ROOT(ns_coefficients=...)", "note": "torch.optim.Muon's row for all shapes"},
    )


def _check_lr(lr: Any) -> None:
    # torch.optim.Muon's own check and message, word for word.
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def _scalar(value: float | Tensor) -> float:
    """A group's lr as a Python number, for checks at construction (``.item()`` syncs: never in the step)."""
    return value.item() if isinstance(value, Tensor) else value


def _lr(value: float | Tensor) -> float | Tensor:
    """A group's lr for the step: a number, or a 1-element tensor squeezed to 0-d (as torch's
    ``_to_scalar``), kept a tensor so the step has no host sync and a compiled step reads its value."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


def _entry_form(entry: TableEntry | None) -> str:
    return entry.form if entry is not None and entry.form is not None else "standard"


def _validate_group(group: dict[str, Any]) -> None:
    _check_lr(group["lr"])
    _check_range("lr", _scalar(group["lr"]), low=0.0)
    _check_range("weight_decay", group["weight_decay"], low=0.0)
    _check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    if group["eps"] is not None:
        _check_range("eps", group["eps"], low=0.0)
    _check_range("adamw_eps", group["adamw_eps"], low=0.0)
    if group["outlier_quantile"] is not None:
        _check_range("outlier_quantile", group["outlier_quantile"], low=0.0, high=1.0, low_open=True)
    steps = group["ns_steps"]
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < MAX_NS_STEPS
    ):
        raise ValueError(f"ns_steps must be None or an integer in [1, {MAX_NS_STEPS}), got {steps!r}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    betas = group["adamw_betas"]
    if len(betas) != 2:
        raise ValueError(f"adamw_betas must be two numbers, got {betas!r}")
    for beta in betas:
        _check_range("adamw_betas", beta, low=0.0, high=1.0, high_open=True)
    if group.get("ns_form") not in NS_FORM_CHOICES:
        raise ValueError(f"ns_form must be one of {NS_FORM_CHOICES}, got {group['ns_form']!r}")
    if group["use_root"] not in (None, True, False):
        raise ValueError(f"use_root must be None, True or False, got {group['use_root']!r}")


def _check_range(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """Groups keep the NS dtype as a name, so state_dicts stay plain data."""
    if dtype is None:
        return None
    resolved = _dtype_from_name(str(dtype).removeprefix("torch."))
    if resolved is None or not resolved.is_floating_point:
        raise ValueError(f"ns_dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    return str(resolved).removeprefix("torch.")


def _dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None
