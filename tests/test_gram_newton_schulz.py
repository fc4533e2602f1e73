"""The Gram form of Newton–Schulz, and fp16 iteration for both forms, against float64 references."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import MUON, POLAR_EXPRESS, SHAPES
from test_newton_schulz import FLOAT64_IDENTITY_RTOL, polar_via_svd, relative_error

from root_core import orthogonalize
from root_core.newton_schulz import coefficient_tensor, default_gram_restarts
from root_core.schedule import Schedule

# DeepSeek-V4's 10-step schedule (docs/design.md §5): 8 × Muon's triple, then 2 × (2, −1.5, 0.5).
DEEPSEEK_V4 = Schedule(rows=((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2)
# float64 Gram vs float64 standard form: the same polynomial, evaluated in another order; the m×m
# products add O(10) roundings of 1e-16 per step, amplified by up to a ≈ 8 per step: ~1e-14 measured.
FORMS_AGREE_RTOL = 1e-12
# float32 Gram vs float64, on SHAPES: ≤ 1.1e-5 measured on rectangular inputs and 3.7e-5 on the square
# 24×24 (σ near 0, where the drift between restarts grows most); the standard form stays ≤ 4e-6.
GRAM_FLOAT32_RTOL = 1e-4
# fp16 keeps 11 bits (4.9e-4). Standard form ≤ 5e-3 on SHAPES, Gram ≤ 8.5e-3 on rectangular ones and
# 1.5e-2 on the square one (measured); bf16 Gram is 2–10× worse than fp16, hence fp16 for the Gram form.
FP16_RTOL = 3e-2
# Near-rank-1 input: one σ ≈ 1 and a tail near 2e-3 that NS lifts to O(0.1–1). fp16 rounds the tail's
# entries to ~4% (they ride on entries 500× larger), so the float64 answer is only reachable to ~2%:
# measured 1.6–1.8e-2 for both forms (float32: 1e-5; bf16: 0.19).
NEAR_RANK_ONE_FP16_RTOL = 4e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS], ids=["muon", "polar-express"])
def test_float64_gram_equals_spectral_identity_and_standard_form(shape, schedule, generator):
    G = torch.randn(shape, generator=generator, dtype=torch.float64)
    gram = orthogonalize(G, schedule, eps=0.0, dtype=torch.float64, form="gram")
    assert gram.shape == G.shape and gram.dtype == G.dtype
    assert relative_error(gram, polar_via_svd(G, schedule)) < FLOAT64_IDENTITY_RTOL
    standard = orthogonalize(G, schedule, eps=0.0, dtype=torch.float64)
    assert relative_error(gram, standard) < FORMS_AGREE_RTOL


@pytest.mark.parametrize("restarts", [(), (1,), (3,), (1, 2, 3, 4, 5, 6, 7, 8, 9)])
def test_any_restart_positions_give_the_same_polynomial(restarts, generator):
    G = torch.randn(2, 20, 56, generator=generator, dtype=torch.float64)
    gram = orthogonalize(G, DEEPSEEK_V4, eps=0.0, dtype=torch.float64, form="gram", restarts=restarts)
    standard = orthogonalize(G, DEEPSEEK_V4, eps=0.0, dtype=torch.float64)
    assert relative_error(gram, standard) < FORMS_AGREE_RTOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS], ids=["muon", "polar-express"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, GRAM_FLOAT32_RTOL), (torch.float16, FP16_RTOL)])
def test_working_dtypes_stay_close_to_float64(shape, schedule, dtype, rtol, generator):
    G = torch.randn(shape, generator=generator)
    reference = orthogonalize(G.double(), schedule, dtype=torch.float64)
    for form in ("standard", "gram"):
        out = orthogonalize(G, schedule, dtype=dtype, form=form)
        assert out.dtype == torch.float32 and out.shape == G.shape
        assert relative_error(out, reference) < rtol, form


def spiky_and_near_rank_one(generator: torch.Generator) -> dict[str, torch.Tensor]:
    m, n = 48, 160
    spiky = torch.randn(m, n, generator=generator)
    spiky.view(-1)[torch.randint(0, m * n, (5,), generator=generator)] = 1e4  # 1e4× the rest
    u, v = torch.randn(m, 1, generator=generator), torch.randn(1, n, generator=generator)
    return {
        "spiky": spiky,
        # Past fp16's range (65504) before normalising, and in its subnormals (< 6.1e-5).
        "spiky, huge": spiky * 1e3,
        "spiky, tiny": spiky * 1e-6,
        "near rank 1": u @ v + 1e-2 * torch.randn(m, n, generator=generator),
        "near rank 1, tall, tiny": (u @ v + 1e-2 * torch.randn(m, n, generator=generator)).mT * 1e-6,
    }


@pytest.mark.parametrize(
    "kind", ["spiky", "spiky, huge", "spiky, tiny", "near rank 1", "near rank 1, tall, tiny"]
)
@pytest.mark.parametrize("form", ["standard", "gram"])
def test_fp16_stays_finite_and_close_on_spiky_and_near_rank_one_inputs(kind, form, generator):
    G = spiky_and_near_rank_one(generator)[kind]
    reference = orthogonalize(G.double(), POLAR_EXPRESS, dtype=torch.float64)
    out = orthogonalize(G, POLAR_EXPRESS, dtype=torch.float16, form=form)
    assert torch.isfinite(out).all()
    rtol = NEAR_RANK_ONE_FP16_RTOL if kind.startswith("near") else FP16_RTOL
    assert relative_error(out, reference) < rtol


def power_law_matrix(generator: torch.Generator, m: int = 96, n: int = 288) -> torch.Tensor:
    """σ_i = i⁻², the deep small-σ tail of clipped momentum (docs/design.md §5)."""
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))
    return ((U * torch.arange(1, m + 1, dtype=torch.float64) ** -2.0) @ V.T).float()


def test_restarts_keep_a_long_fp16_schedule_from_blowing_up(generator):
    """Without restarts the Gram matrix drifts from XXᵀ by up to a² per step on small σ; ten steps
    of it overflow fp16. The default restarts (every 2nd step) keep the standard form's error."""
    G = power_law_matrix(generator)
    reference = orthogonalize(G.double(), DEEPSEEK_V4, dtype=torch.float64)
    standard = relative_error(orthogonalize(G, DEEPSEEK_V4, dtype=torch.float16), reference)
    never = orthogonalize(G, DEEPSEEK_V4, dtype=torch.float16, form="gram", restarts=())
    assert not torch.isfinite(never).all() or relative_error(never, reference) > 10 * standard
    default = orthogonalize(G, DEEPSEEK_V4, dtype=torch.float16, form="gram")
    assert relative_error(default, reference) < 1.5 * standard


@pytest.mark.parametrize(
    ("steps", "restarts"),
    [(1, ()), (2, ()), (3, (2,)), (4, (2,)), (5, (2,)), (6, (2, 4)), (7, (2, 4)), (10, (2, 4, 6, 8))],
)
def test_default_restarts_every_second_step_without_a_lone_last_step(steps, restarts):
    assert default_gram_restarts(steps) == restarts


@pytest.mark.slow
def test_gram_form_compiles_into_one_graph(generator):
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda G: orthogonalize(G, POLAR_EXPRESS, dtype=torch.float32, form="gram"), fullgraph=True
    )
    G = torch.randn(3, 24, 64, generator=generator)
    torch.testing.assert_close(
        compiled(G), orthogonalize(G, POLAR_EXPRESS, dtype=torch.float32, form="gram"), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: orthogonalize(torch.ones(4, 8), MUON, form="fast"),
            "Newton–Schulz form must be one of ('standard', 'gram'), got 'fast'",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 8), MUON, form="gram", restarts=(0,)),
            "Gram restarts must be steps in [1, 4], got 0",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 8), POLAR_EXPRESS, form="gram", restarts=(5,)),
            "Gram restarts must be steps in [1, 4], got 5",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 8), coefficient_tensor(MUON), form="gram"),
            "form='gram' takes coefficient rows (a Schedule or a list), not a tensor",
        ),
    ],
)
def test_bad_input_is_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (4, 128, 384)])
def test_cuda_fp16_gram_tracks_the_float64_cpu_reference_without_a_host_sync(shape, generator):
    G = torch.randn(shape, generator=generator)
    reference = orthogonalize(G.double(), POLAR_EXPRESS, dtype=torch.float64)
    on_device = G.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = orthogonalize(on_device, POLAR_EXPRESS, dtype=torch.float16, form="gram")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert relative_error(out.cpu(), reference) < FP16_RTOL
