"""ROOT's step batches same-shape matrices and compiles with torch.compile(fullgraph=True) (issue 13)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import root_core.optimizer
from root_core import ROOT, root_param_groups
from root_core.optimizer import group_layout

pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

# Four wide, three tall and two square matrices: three batches, and one matrix of a fourth shape alone.
SHAPES = [(32, 80)] * 4 + [(80, 32)] * 3 + [(48, 48)] * 2 + [(16, 24)]
# Compiled against eager, float32 NS, two steps: inductor fuses the elementwise work and reorders the
# norm's and the quantile's reductions, and AdamW computes its bias correction as a float32 tensor when
# compiling (eager: Python floats); five NS steps amplify those ~1e-7 differences. Measured ≤ 2.2e-6 of
# each parameter's change (1.4e-6 with dynamo's eager backend); 1e-4 leaves ~50x room, while a dropped
# weight decay, a wrong lr or a missed momentum step changes the result by ≥ 1e-2 of the change.
COMPILED_RTOL = 1e-4


def make_params(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def feed(optimizer, params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()


def record_batches(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes ROOT hands to the clip and NS, one entry per call."""
    shapes = []
    original = root_core.optimizer.clipped_direction

    def recording(update, *args, **kwargs):
        shapes.append(tuple(update.shape))
        return original(update, *args, **kwargs)

    monkeypatch.setattr(root_core.optimizer, "clipped_direction", recording)
    return shapes


def test_same_shape_matrices_step_as_one_batch_and_stay_bit_identical_to_torch_muon(monkeypatch):
    calls = record_batches(monkeypatch)
    ours, theirs = make_params(), make_params()
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    root = ROOT(ours, outlier_quantile=None, ns_dtype=torch.bfloat16, **settings)
    muon = torch.optim.Muon(theirs, **settings)
    for step in range(3):
        feed(root, ours, step)
        feed(muon, theirs, step)
        # bf16 bmm gives each matrix the bits mm gives it on the CPU (checked on 18 shapes from 1×7 to
        # 512×512), so a batched ROOT still equals torch.optim.Muon's matrix-by-matrix step exactly.
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}, shape {tuple(a.shape)}"
    assert calls[:4] == [(4, 32, 80), (3, 80, 32), (2, 48, 48), (16, 24)]
    assert len(calls) == 12  # four calls a step, not ten


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_batched_step_equals_the_matrix_by_matrix_step_with_the_soft_threshold(monkeypatch, ns_dtype):
    batched, alone = make_params(), make_params()
    root = ROOT(batched, lr=0.02, ns_dtype=ns_dtype)
    monkeypatch.setattr(root_core.optimizer, "BATCH_ELEMENTS", 1)  # every matrix a batch of its own
    one_by_one = ROOT(alone, lr=0.02, ns_dtype=ns_dtype)
    assert all(len(batch) == 1 for batch in one_by_one._layout_of(0, one_by_one.param_groups[0]).batches)
    for step in range(2):
        feed(root, batched, step)
        feed(one_by_one, alone, step)
    for a, b in zip(batched, alone, strict=True):
        # float32 bmm and mm agree to the bit on these shapes too; on the CPU only matrices whose
        # products take under 400 multiply-adds (7×7, 4×6) differ, by rounding (~1e-7): aten's bmm
        # runs a naive kernel for them. bf16 agreed on every shape tried.
        assert torch.equal(a, b), tuple(a.shape)


def test_a_matrix_without_a_gradient_leaves_its_batch():
    params = make_params([(24, 40)] * 3)
    reference = make_params([(24, 40)] * 3)
    root = ROOT(params, lr=0.02, ns_dtype=torch.float32)
    alone = ROOT([reference[0], reference[2]], lr=0.02, ns_dtype=torch.float32)
    before = params[1].detach().clone()
    generator = torch.Generator().manual_seed(5)
    for p, r in zip(params, reference, strict=True):
        p.grad = torch.randn(p.shape, generator=generator)
        r.grad = p.grad.clone()
    params[1].grad = None
    root.step()
    alone.step()
    assert torch.equal(params[1], before) and "momentum_buffer" not in root.state[params[1]]
    assert torch.equal(params[0], reference[0]) and torch.equal(params[2], reference[2])


def test_layout_batches_by_shape_dtype_and_device_within_the_element_budget():
    params = make_params([(4, 6), (6, 4), (4, 6), (4, 6), (8, 3, 2), (5,)])
    params.append(nn.Parameter(torch.ones(4, 6, dtype=torch.float64)))
    group = {"params": params, "use_root": None}
    layout = group_layout(group, max_elements=48)  # two 4×6 matrices a batch
    shapes = [[(*p.shape, p.dtype) for p in batch] for batch in layout.batches]
    f32, f64 = torch.float32, torch.float64
    assert shapes == [
        [(4, 6, f32), (4, 6, f32)],
        [(4, 6, f32)],
        [(6, 4, f32)],  # tall apart from wide
        [(8, 3, 2, f32)],  # a conv kernel batches as its (8, 6) matrix
        [(4, 6, f64)],
    ]
    assert [tuple(p.shape) for p in layout.adamw] == [(5,)] and layout.sharded == ()
    assert group_layout(group, max_elements=1).batches[0] == (params[0],)  # always at least one


def test_a_replaced_parameter_list_is_laid_out_again():
    params = make_params([(8, 12)] * 2)
    root = ROOT(params[:1], lr=0.02)
    root.param_groups[0]["params"] = params  # not the usual way, but torch optimizers allow it
    for p in params:
        p.grad = torch.ones_like(p)
    root.step()
    assert all("momentum_buffer" in root.state[p] for p in params)


# ---- torch.compile ---------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(32, 16),  # AdamW (an embedding)
        nn.Flatten(),
        nn.Linear(64, 24),
        nn.Linear(24, 24),  # two 24×24 matrices: one batch
        nn.Linear(24, 24),
        nn.Linear(24, 32),  # the head: AdamW
    )


def compiled_and_eager_runs(backend: str, steps: int = 2, ns_form: str | None = None):
    """Two copies of a small model, one stepped by torch.compile(opt.step, fullgraph=True), one eagerly."""
    torch._dynamo.reset()
    start = small_model()
    tokens = torch.randint(0, 32, (8, 4), generator=torch.Generator().manual_seed(1))
    models, optimizers = [], []
    for _ in range(2):
        model = copy.deepcopy(start)
        groups = root_param_groups(model, adamw_lr=torch.tensor(3e-3))
        models.append(model)
        optimizers.append(ROOT(groups, lr=torch.tensor(0.02), ns_dtype=torch.float32, ns_form=ns_form))
    compiled_step = torch.compile(optimizers[1].step, fullgraph=True, backend=backend)  # raises on a break
    for _ in range(steps):
        for model in models:
            model.zero_grad()
            nn.functional.cross_entropy(model(tokens), tokens[:, 0]).backward()
        optimizers[0].step()
        compiled_step()
    return start, models, optimizers, compiled_step


def assert_compiled_matches_eager(start, eager, compiled):
    initial = dict(start.named_parameters())
    for (name, e), c in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        change = (e - initial[name]).norm()
        assert change > 0, name
        assert (c - e).norm() <= COMPILED_RTOL * change, name


def test_the_step_traces_whole_and_a_tensor_lr_changes_without_recompiling():
    start, (eager, compiled), (eager_opt, compiled_opt), compiled_step = compiled_and_eager_runs("eager")
    assert_compiled_matches_eager(start, eager, compiled)
    for optimizer in (eager_opt, compiled_opt):
        for group in optimizer.param_groups:
            group["lr"].fill_(group["lr"] * 0.5)  # what an LR scheduler with a tensor lr does
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_step()
    eager_opt.step()
    assert_compiled_matches_eager(start, eager, compiled)  # the halved lr reached the compiled step


def test_the_gram_form_step_traces_whole_too():
    start, (eager, compiled), _, _ = compiled_and_eager_runs("eager", ns_form="gram")
    assert_compiled_matches_eager(start, eager, compiled)


@pytest.mark.slow
def test_two_inductor_compiled_steps_match_eager():
    start, (eager, compiled), _, _ = compiled_and_eager_runs("inductor")
    assert_compiled_matches_eager(start, eager, compiled)
