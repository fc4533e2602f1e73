"""ROOT against every input torch tests torch.optim.Muon with (torch.testing's OptimizerInfo for Muon).

The inputs are imported, not copied, so an input a new torch adds is checked here automatically.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    get_error_inputs_for_all_optims,
    optim_db,
    optim_inputs_func_muon,
)

from root_core import ROOT, CoefficientTable, orthogonalize

MUON_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.Muon)
# ROOT's extras set to Muon's behaviour: Muon's row, no soft-threshold, bf16 iteration (as Muon anywhere).
AS_MUON = dict(outlier_quantile=None, ns_dtype=torch.bfloat16)
SHAPES = [(24, 40), (40, 24), (32, 32)]  # wide, tall, square
STEPS = 3


def params(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def run_side_by_side(kwargs: dict, grad_scale: float = 1.0) -> None:
    ours, theirs = params(), params()
    root = ROOT(ours, **AS_MUON, **kwargs)
    muon = torch.optim.Muon(theirs, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=generator) * grad_scale
            b.grad = a.grad.clone()
        root.step()
        muon.step()
        for a, b in zip(ours, theirs, strict=True):
            # Bit-identical: the same ops in the same order (bf16 NS with fused addmm, the clamp(min=eps)
            # normaliser, Muon's lerp momentum and shape-adjusted lr); any difference is a bug.
            assert torch.equal(a, b), f"step {step}, shape {tuple(a.shape)}, kwargs {kwargs}"


@pytest.mark.parametrize("optim_input", optim_inputs_func_muon("cpu"), ids=lambda i: i.desc)
def test_every_muon_input_gives_muons_update(optim_input):
    assert optim_input.params is None  # torch's inputs leave the parameters to the test
    run_side_by_side(dict(optim_input.kwargs))


def test_the_inputs_come_from_torchs_optimizer_info():
    # The same function the OptimizerInfo uses, so a new input in torch is a new case above.
    assert MUON_INFO.optim_inputs_func is optim_inputs_func_muon
    descs = {i.desc for i in optim_inputs_func_muon("cpu")}
    assert {"Tensor lr", "passing alternative ns_coefficients"} <= descs


@pytest.mark.parametrize("grad_scale", [1e-8, 1e-10, 0.0])
def test_tiny_gradients_give_muons_update(grad_scale):
    # Muon divides by max(‖G‖, eps); ROOT used ‖G‖ + eps, 13% of the update apart at 1e-8.
    run_side_by_side({"lr": 0.02}, grad_scale=grad_scale)


# Muon's own error inputs where ROOT deliberately differs, with what ROOT does instead. Anything else, and
# every generic input of get_error_inputs_for_all_optims, must behave exactly as torch says.
ROOT_DIFFERS = {
    # ROOT takes conv kernels (out, in, *k) as (out, in·∏k) matrices, and sends other non-matrices to AdamW.
    "only support 2D parameters": None,
    # ROOT's message lists the allowed values.
    "only support `original` and `match_rms_adamw`": (
        ValueError,
        "adjust_lr_fn must be one of (None, 'original', 'match_rms_adamw'), got 'arbitrary'",
    ),
    # ROOT refuses at construction, like its other bad inputs, rather than at the first step.
    "does not support complex parameters": (ValueError, "ROOT does not support complex parameters"),
}


def error_inputs():
    inputs = MUON_INFO.optim_error_inputs_func("cpu", torch.float32)
    generic = {i.optimizer_error_input.desc for i in get_error_inputs_for_all_optims("cpu", torch.float32)}
    assert generic and generic <= {i.optimizer_error_input.desc for i in inputs}
    assert not generic & set(ROOT_DIFFERS)  # torch's generic messages are matched word for word
    return inputs


@pytest.mark.parametrize("error_input", error_inputs(), ids=lambda e: e.optimizer_error_input.desc)
def test_muons_error_inputs(error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs, desc = optim_input.params, optim_input.kwargs, optim_input.desc
    if desc in ROOT_DIFFERS:
        expected = ROOT_DIFFERS[desc]
        if expected is None:
            ROOT(params, **kwargs).step()
        else:
            with pytest.raises(expected[0], match=re.escape(expected[1])):
                ROOT(params, **kwargs)
        return
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        make = lambda: ROOT(params, **kwargs)  # noqa: E731
    else:
        make = ROOT(params, **kwargs).step
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            make()
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            make()


def test_ns_coefficients_is_a_one_row_table():
    root = ROOT(params(), ns_coefficients=(3.4, -4.7, 2.0))
    assert root.table.default == ((3.4, -4.7, 2.0),) and root.table.entries == ()
    assert root.table.normalization.eps == 1e-7  # Muon's
    with pytest.raises(ValueError, match=re.escape("pass table= or ns_coefficients=, not both")):
        ROOT(params(), table="muon", ns_coefficients=(3.4, -4.7, 2.0))
    with pytest.raises(ValueError, match=re.escape("ns_coefficients must be three finite numbers (a, b, c)")):
        ROOT(params(), ns_coefficients=(3.4, -4.7))
    with pytest.raises(ValueError, match=re.escape("ns_coefficients is a ROOT constructor argument")):
        ROOT([{"params": params(), "ns_coefficients": (3.4, -4.7, 2.0)}])


def test_a_tensor_lr_follows_a_scheduler_that_fills_it():
    ours, theirs = params(), params()
    root = ROOT(ours, lr=torch.tensor(0.02), **AS_MUON)
    muon = torch.optim.Muon(theirs, lr=torch.tensor(0.02))
    for optimizer in (root, muon):
        optimizer.param_groups[0]["lr"].fill_(0.005)
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    root.step()
    muon.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# ---- eps: the table's, unless ROOT's eps= is given ------------------------------------------------------
def test_the_tables_eps_is_the_normalisers_floor_and_eps_overrides_it():
    table = CoefficientTable.create(name="wide-eps", default_rows=(3.4445, -4.7750, 2.0315), eps=1e-3)
    grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(2)) * 1e-5  # ‖G‖ ≈ 2e-4 < 1e-3

    def direction(**kwargs) -> torch.Tensor:
        p = nn.Parameter(torch.zeros(16, 24))
        settings = dict(lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, outlier_quantile=None)
        root = ROOT([p], **settings, ns_dtype=torch.float32, **kwargs)
        p.grad = grad.clone()
        root.step()
        return -p.detach()  # lr 1 and a wide matrix: the step is the direction itself

    expected = orthogonalize(grad, table.default_schedule, eps=1e-3, dtype=torch.float32)
    assert torch.equal(direction(table=table), expected)
    overridden = orthogonalize(grad, table.default_schedule, eps=1e-9, dtype=torch.float32)
    assert torch.equal(direction(table=table, eps=1e-9), overridden)
    assert not torch.allclose(expected, overridden)  # the floor is active at this gradient scale
    assert ROOT(params(), table=table).param_groups[0]["eps"] is None  # None: the table's, at each step


def test_show_prints_the_normalisation_the_runtime_uses():
    from typer.testing import CliRunner

    from calibrate.cli import app, with_default_command

    shown = CliRunner().invoke(app, with_default_command(["show", "polar-express"]))
    assert shown.exit_code == 0, shown.output
    assert "X = G / max(1.02·‖G‖_F, 1e-06)" in shown.output
