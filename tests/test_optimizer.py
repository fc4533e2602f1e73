"""ROOT against torch.optim.Muon, torch.optim.AdamW and a float64 re-implementation of the paper."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import FRAGILE
from torch import nn

from root_core import ROOT, CoefficientTable, load_table, orthogonalize, root_param_groups
from root_core.optimizer import FragileScheduleWarning, adjusted_lr

# Most tests use shapes the bundled tables do not list, on purpose; the warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

# docs/design.md §2, huawei-noah/noah-research ROOT/examples/example_train.py: the 2048×2048 triple.
ROOT_PAPER_2048 = (3.4916, -4.8224, 2.1095)
# float64 everywhere on both sides: the only differences are summation order in matmuls (~1e-15 per op,
# amplified by ≤ 5 NS steps and two optimizer steps) and the eps seen at another momentum scale
# (1e-7 against a norm of ~1e5). Measured 1e-12 relative on the change of the parameters; 1e-9 still
# catches any algorithmic difference, which would show at ≥ 1e-3.
FLOAT64_REFERENCE_RTOL = 1e-9


def make_params(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def feed(optimizer, params, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 3.0
        optimizer.step()


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_step_for_step(adjust_lr_fn, nesterov):
    shapes = [(32, 80), (80, 32), (48, 48)]
    ours, theirs = make_params(*shapes), make_params(*shapes)
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    root = ROOT(ours, table="muon", outlier_quantile=None, ns_dtype=torch.bfloat16, **settings)
    muon = torch.optim.Muon(theirs, **settings)
    for step in range(4):
        feed(root, ours, 1, seed=step)
        feed(muon, theirs, 1, seed=step)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}, shape {tuple(a.shape)}"


def reference_root_step(p, grad, buf, *, lr, weight_decay, momentum=0.95, quantile=0.9):
    """The ROOT reference algorithm of docs/design.md §2, written out in float64 with numpy's quantile."""
    buf.mul_(momentum).add_(grad)  # buf = μ·buf + g
    g = grad + momentum * buf  # Nesterov
    epsilon = float(np.quantile(g.abs().numpy(), quantile))
    B = g.clamp(-epsilon, epsilon)  # B = M − T_ε(M)
    X = B / B.norm().clamp(min=1e-7)  # the floor torch.optim.Muon and ROOT use
    a, b, c = ROOT_PAPER_2048
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    p.mul_(1 - lr * weight_decay)
    p.add_(X, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


@pytest.mark.slow
def test_matches_a_float64_reimplementation_of_the_paper_on_2048x2048():
    (ours,) = make_params((2048, 2048))
    ours.data = ours.data.double()
    initial = ours.detach().clone()
    reference, buf = initial.clone(), torch.zeros_like(ours)
    # The paper's 2048x2048 triple is fragile under rounding (docs/design.md §1: 3.31 even on [0, 1]); float64
    # here, so the warning is all it costs.
    with pytest.warns(
        FragileScheduleWarning, match=r"'root-paper@1' rows for 2048x2048 reach P = 7\.68e\+13"
    ):
        root = ROOT(
            [ours],
            lr=0.01,
            weight_decay=0.1,
            table="root-paper",
            outlier_quantile=0.9,
            adjust_lr_fn="match_rms_adamw",
            ns_dtype=torch.float64,
        )
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        grad = torch.randn(2048, 2048, generator=generator, dtype=torch.float64) ** 3  # outlier-heavy
        ours.grad = grad.clone()
        root.step()
        reference_root_step(reference, grad, buf, lr=0.01, weight_decay=0.1)
    # Compare what the two steps changed, as a whole: entries near zero make elementwise ratios meaningless.
    ours_change, reference_change = ours.detach() - initial, reference - initial
    assert (ours_change - reference_change).norm() < FLOAT64_REFERENCE_RTOL * reference_change.norm()


def test_soft_threshold_changes_the_update_only_when_on():
    plain, clipped = make_params((24, 40)), make_params((24, 40))
    feed(ROOT(plain, table="muon", outlier_quantile=None), plain, 2)
    feed(ROOT(clipped, table="muon", outlier_quantile=0.9), clipped, 2)
    assert not torch.allclose(plain[0], clipped[0])


def test_non_matrix_parameters_get_torch_adamw_exactly():
    params = make_params((20,), (3, 5, 7))
    (bias,) = make_params((20,))
    root = ROOT(
        [{"params": [params[0]]}, {"params": [params[1]], "use_root": False}],
        lr=3e-3,
        weight_decay=0.05,
        adamw_betas=(0.85, 0.97),
        adamw_eps=1e-7,
    )
    reference = torch.optim.AdamW(
        [bias, copy.deepcopy(params[1])], lr=3e-3, weight_decay=0.05, betas=(0.85, 0.97), eps=1e-7
    )
    reference_params = [bias, reference.param_groups[0]["params"][1]]
    for step in range(3):
        feed(root, params, 1, seed=step)
        feed(reference, reference_params, 1, seed=step)
    for a, b in zip(params, reference_params, strict=True):
        assert torch.equal(a, b)


def test_conv_kernels_are_orthogonalised_as_out_by_rest():
    (kernel,) = make_params((8, 3, 3, 3))
    before = kernel.detach().clone()
    root = ROOT([kernel], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, outlier_quantile=None)
    generator = torch.Generator().manual_seed(3)
    kernel.grad = torch.randn(kernel.shape, generator=generator)
    expected_update = orthogonalize(
        kernel.grad.reshape(8, 27), load_table("muon").schedule_for((8, 27)), dtype=torch.float32
    )
    root.step()
    lr = adjusted_lr(0.1, None, (8, 27))
    torch.testing.assert_close(kernel.detach(), before - lr * expected_update.reshape(8, 3, 3, 3))


def test_per_shape_table_rows_are_used_and_looked_up_once(monkeypatch):
    listed_rows = ((2.0, -1.5, 0.5), (1.5, -0.5, 0.0))
    table = CoefficientTable.create(
        name="custom", default_rows=(3.4445, -4.7750, 2.0315), entries={(32, 64): listed_rows}
    )
    calls = []
    original = CoefficientTable.schedule_for
    monkeypatch.setattr(
        CoefficientTable,
        "schedule_for",
        lambda self, shape, missing="default": calls.append(tuple(shape)) or original(self, shape, missing),
    )
    params = make_params((64, 32), (32, 64))
    before = [p.detach().clone() for p in params]
    root = ROOT(
        params, lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, outlier_quantile=None, table=table
    )
    feed(root, params, 1)
    assert len(calls) == 1  # one canonical shape, looked up once at construction
    expected = orthogonalize(params[0].grad, listed_rows, dtype=torch.float32)
    torch.testing.assert_close(params[0].detach(), before[0] - adjusted_lr(0.1, None, (64, 32)) * expected)
    feed(root, params, 2)
    assert len(calls) == 1


def test_missing_shapes_follow_the_policy():
    with pytest.raises(LookupError, match=re.escape("(16, 24)")):
        ROOT(make_params((24, 16)), table="root-paper", missing_shape="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = make_params((24, 16), (16, 24))
        feed(ROOT(params, table="root-paper"), params, 2)
    assert len([w for w in caught if "(16, 24)" in str(w.message)]) == 1


def test_state_dict_round_trips_and_resumes_identically():
    params = make_params((16, 24), (24,))
    root = ROOT(params, lr=0.01, table="root-paper")
    feed(root, params, 3)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(root.state_dict())
    feed(root, params, 2, seed=9)
    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    other = ROOT(resumed, lr=0.01, table="root-paper")
    other.load_state_dict(saved_state)
    feed(other, resumed, 2, seed=9)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    assert {(g["root_table"], g["root_table_hash"]) for g in other.state_dict()["param_groups"]} == {
        ("root-paper@1", load_table("root-paper").coefficients_hash)
    }


def test_loading_state_from_another_table_says_so():
    params = make_params((16, 24))
    root = ROOT(params, table="root-paper")
    feed(root, params, 1)
    with pytest.raises(ValueError, match=re.escape("optimizer state was saved with table 'root-paper@1'")):
        ROOT(make_params((16, 24)), table="muon").load_state_dict(root.state_dict())


def test_old_checkpoints_without_new_group_keys_still_load():
    params = make_params((16, 24))
    root = ROOT(params)
    feed(root, params, 1)
    state = root.state_dict()
    del state["param_groups"][0]["outlier_quantile"]
    fresh = ROOT(make_params((16, 24)))
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["outlier_quantile"] == 0.9


def test_loss_of_a_small_model_goes_down():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(32, 64),
        nn.Flatten(),
        nn.Linear(4 * 64, 128),
        nn.ReLU(),
        nn.LayerNorm(128),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 32),
    )
    tokens = torch.randint(0, 32, (256, 4))
    targets = (tokens.sum(dim=1) * 7) % 32  # learnable, not memorisable from one token
    groups = root_param_groups(model, adamw_lr=3e-3)  # the last Linear is the 32-token head
    optimizer = ROOT(groups, lr=0.02, weight_decay=0.0, table="root-paper")
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(tokens), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "lr must be a finite number in [0.0, inf), got -1.0"),
        (dict(momentum=1.0), "momentum must be a finite number in [0.0, 1.0), got 1.0"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number in [0.0, inf), got nan"),
        (dict(outlier_quantile=0.0), "outlier_quantile must be a finite number in (0.0, 1.0], got 0.0"),
        (dict(ns_steps=0), "ns_steps must be None or an integer in [1, 100), got 0"),
        (
            dict(adjust_lr_fn="rms"),
            "adjust_lr_fn must be one of (None, 'original', 'match_rms_adamw'), got 'rms'",
        ),
        (
            dict(ns_dtype=torch.int32),
            "ns_dtype must be a floating torch dtype such as torch.bfloat16, got torch.int32",
        ),
        (
            dict(missing_shape="skip"),
            "missing_shape must be one of ('default', 'error', 'nearest'), got 'skip'",
        ),
        (dict(adamw_betas=(0.9, 1.5)), "adamw_betas must be a finite number in [0.0, 1.0), got 1.5"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ROOT(make_params((4, 6)), **kwargs)


def test_vectors_in_a_root_only_group_are_refused():
    with pytest.raises(ValueError, match=re.escape("a use_root=True group holds a parameter of shape (7,)")):
        ROOT([{"params": make_params((7,)), "use_root": True}])


# bf16 Newton–Schulz with Muon's row is 1.2–2.5% off float64 per direction (root_core/newton_schulz.py);
# over three steps the total change of each parameter here was 0.23% and 0.35% off the float64 change with
# bf16 on the CPU (not yet measured on a GPU). 2% leaves ~6x room; an update not applied at all is 100% off.
CUDA_BF16_RTOL = 0.02


@pytest.mark.gpu
def test_runs_on_cuda_in_bf16_and_tracks_a_float64_cpu_reference():
    shapes = ((256, 688), (688, 256))  # wide and tall; not in root-paper, so its default (Muon's) rows
    gpu = [nn.Parameter(p.detach().cuda()) for p in make_params(*shapes)]
    reference = [nn.Parameter(p.detach().double()) for p in make_params(*shapes)]
    initial = [p.detach().clone() for p in reference]  # a copy: .double() of a float64 tensor is itself
    root_gpu = ROOT(gpu, lr=0.01, table="root-paper")
    assert root_gpu.param_groups[0]["ns_dtype"] is None  # default: bf16 on CUDA
    root_reference = ROOT(reference, lr=0.01, table="root-paper", ns_dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for g, r in zip(gpu, reference, strict=True):
            grad = torch.randn(r.shape, generator=generator, dtype=torch.float64) * 3.0
            r.grad, g.grad = grad, grad.float().cuda()
        root_gpu.step()
        root_reference.step()
    for g, r, start in zip(gpu, reference, initial, strict=True):
        expected = r.detach() - start  # the float64 change: weight decay and three orthogonalised updates
        change = g.detach().cpu().double() - start
        # The tolerance is a fraction of the update itself, so a no-op (change 0, error = ‖expected‖) fails.
        assert 0 < CUDA_BF16_RTOL < 1 and expected.norm() > 0
        assert (change - expected).norm() <= CUDA_BF16_RTOL * expected.norm(), tuple(g.shape)


@pytest.mark.gpu
def test_a_cuda_step_never_waits_for_the_device():
    """Batched clip, NS and the AdamW route in one step, with every device→host sync made an error."""
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 96), nn.Linear(96, 32), nn.Linear(32, 64))
    model = model.cuda()
    optimizer = ROOT(root_param_groups(model, output_head=model[3]), lr=0.01, table="polar-express")
    tokens = torch.randint(0, 64, (8, 16), device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        model(tokens).square().mean().backward()
        optimizer.step()

    step()  # the first step creates the momentum buffers and AdamW state
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any op that waits for the device raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fragile_rows_warn_once_per_shape_and_robust_ones_do_not():
    fragile = CoefficientTable.create(
        name="fragile",
        default_rows=load_table("muon").default_schedule.rows,
        entries={(64, 128): list(FRAGILE.rows)},
    )
    params = make_params((64, 128), (128, 64))  # one canonical shape, two orientations
    with pytest.warns(FragileScheduleWarning) as caught:
        root = ROOT(params, table=fragile)
    assert [str(w.message) for w in caught] == [
        "table 'fragile@1' rows for 64x128 reach P = 1.37e+32 when rounding pushes σ 2% above 1; they may "
        "diverge in bf16 (refit with root-calibrate, or use ns_dtype=torch.float32)"
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root.step()  # no second warning for a shape already checked
        ROOT(make_params((64, 128)), table="polar-express")
