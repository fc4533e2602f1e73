"""orthogonalize against float64 references: the SVD polar factor and the spectral identity."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CLASSIC, MUON, POLAR_EXPRESS, SHAPES
from torch.optim._muon import _zeropower_via_newtonschulz as muon_newton_schulz

from root_core import orthogonalize
from root_core.newton_schulz import coefficient_tensor, default_ns_dtype
from root_core.schedule import Schedule
from root_core.spectral import compose

# float64 NS vs U·P(Σ)·Vᵀ built from a float64 SVD: both are exact up to round-off of O(10) matmuls
# on O(1) entries, so 1e-10 leaves three orders of magnitude of headroom over the ~1e-13 we see.
FLOAT64_IDENTITY_RTOL = 1e-10
# 40 classic steps take σ ≥ 1e-2 to 1 within 1e-14 (slope 15/8 at 0, cubic near 1); 1e-9 covers SVD noise.
CONVERGED_RTOL = 1e-9
# float32 NS vs float64 NS: five steps amplify float32 round-off (6e-8) by at most the polynomial's
# Lipschitz constant per step; measured ~2e-6 on these shapes.
FLOAT32_RTOL = 2e-5
# bf16 NS vs float64 NS: bf16 keeps 8 bits (3.9e-3); measured 1.2% on 256×512 Gaussian, ~1–2% here.
BF16_RTOL = 5e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def polar_via_svd(G: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
    """U·P(Σ̂)·Vᵀ in float64, with Σ̂ = Σ/‖G‖_F; without a schedule, the exact polar factor U Vᵀ."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    if schedule is None:
        return U @ Vh
    frob = G.double().norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    return U @ torch.diag_embed(compose(S / frob, schedule)) @ Vh


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", [MUON, POLAR_EXPRESS], ids=["muon", "polar-express"])
def test_float64_iteration_equals_spectral_identity(shape, schedule, generator):
    G = torch.randn(shape, generator=generator, dtype=torch.float64)
    out = orthogonalize(G, schedule, eps=0.0, dtype=torch.float64)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert relative_error(out, polar_via_svd(G, schedule)) < FLOAT64_IDENTITY_RTOL


@pytest.mark.parametrize("shape", SHAPES)
def test_convergent_schedule_reaches_svd_polar_factor(shape, generator):
    # Condition the matrices so every normalised σ is ≥ 1e-2: U·diag(1..3)·Vᵀ.
    U, _, Vh = torch.linalg.svd(
        torch.randn(shape, generator=generator, dtype=torch.float64), full_matrices=False
    )
    r = min(shape[-2:])
    G = U @ torch.diag_embed(torch.linspace(1.0, 3.0, r, dtype=torch.float64).expand(*shape[:-2], r)) @ Vh
    out = orthogonalize(G, CLASSIC, eps=0.0, dtype=torch.float64, steps=40)
    assert relative_error(out, U @ Vh) < CONVERGED_RTOL


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_input_gives_the_scalar_composition(shape):
    m, n = shape[-2:]
    sigma = torch.logspace(-4, 0, min(m, n), dtype=torch.float64)
    G = torch.zeros(shape, dtype=torch.float64)
    G.diagonal(dim1=-2, dim2=-1).copy_(sigma)
    out = orthogonalize(G, POLAR_EXPRESS, eps=0.0, dtype=torch.float64)
    expected = compose(sigma / sigma.norm(), POLAR_EXPRESS)
    diagonal = out.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(
        diagonal, expected.expand_as(diagonal), rtol=FLOAT64_IDENTITY_RTOL, atol=FLOAT64_IDENTITY_RTOL
    )
    off_diagonal = out.clone()
    off_diagonal.diagonal(dim1=-2, dim2=-1).zero_()
    assert off_diagonal.abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, FLOAT32_RTOL), (torch.bfloat16, BF16_RTOL)])
def test_working_dtypes_stay_close_to_float64(shape, dtype, rtol, generator):
    G = torch.randn(shape, generator=generator)
    reference = orthogonalize(G.double(), MUON, dtype=torch.float64)
    out = orthogonalize(G, MUON, dtype=dtype)
    assert out.dtype == torch.float32 and out.shape == G.shape
    assert relative_error(out, reference) < rtol


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_bf16_matches_torch_muon_bit_for_bit(shape, generator):
    G = torch.randn(shape, generator=generator)
    ours = orthogonalize(G, MUON, dtype=torch.bfloat16)
    theirs = muon_newton_schulz(G, MUON.rows[0], 5, 1e-7).float()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("magnitude", [0.0, 1e-30])
def test_zero_and_tiny_matrices_give_zeros_not_nan(dtype, magnitude):
    G = torch.full((2, 8, 12), magnitude, dtype=dtype)
    out = orthogonalize(G, POLAR_EXPRESS, dtype=dtype)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e-12


def test_output_keeps_the_input_dtype_with_another_iteration_dtype(generator):
    G = torch.randn(8, 16, generator=generator).half()
    assert orthogonalize(G, MUON, dtype=torch.float32).dtype == torch.float16


def test_default_iteration_dtype_is_bf16_on_cuda_float32_on_cpu():
    assert default_ns_dtype("cpu") == torch.float32
    assert default_ns_dtype("cuda") == torch.bfloat16
    assert default_ns_dtype("cuda", "gram") == torch.float16  # bf16 Gram: 1.5–5× the standard error
    assert default_ns_dtype("cpu", "gram") == torch.float32


def test_single_row_repeats_and_extra_steps_reuse_the_last_row(generator):
    G = torch.randn(10, 14, generator=generator, dtype=torch.float64)
    one_row = orthogonalize(G, MUON, dtype=torch.float64, steps=3)
    explicit = orthogonalize(G, [MUON.rows[0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(one_row, explicit, rtol=0, atol=0)
    longer = orthogonalize(G, POLAR_EXPRESS, dtype=torch.float64, steps=7)
    rows = [*POLAR_EXPRESS.rows, POLAR_EXPRESS.rows[-1], POLAR_EXPRESS.rows[-1]]
    torch.testing.assert_close(
        longer, orthogonalize(G, Schedule(rows=tuple(rows), scale=1.02), dtype=torch.float64), rtol=0, atol=0
    )


def test_tensor_coefficients_fold_the_scale_into_the_first_row(generator):
    G = torch.randn(3, 12, 20, generator=generator, dtype=torch.float64)
    folded = coefficient_tensor(POLAR_EXPRESS).double()
    # coefficient_tensor rounds to float32, so compare against the same rows rounded the same way.
    rows = tuple(tuple(r) for r in coefficient_tensor(POLAR_EXPRESS.with_steps(None)).double().tolist())
    via_rows = orthogonalize(G, Schedule(rows=rows), eps=0.0, dtype=torch.float64)
    torch.testing.assert_close(
        orthogonalize(G, folded, eps=0.0, dtype=torch.float64),
        via_rows,
        rtol=FLOAT64_IDENTITY_RTOL,
        atol=FLOAT64_IDENTITY_RTOL,
    )
    exact = orthogonalize(G, POLAR_EXPRESS, eps=0.0, dtype=torch.float64)
    assert relative_error(via_rows, exact) < FLOAT32_RTOL


def test_tensor_path_in_bf16_keeps_coefficients_in_float32(generator):
    G = torch.randn(64, 128, generator=generator)
    reference = orthogonalize(G.double(), MUON, dtype=torch.float64)
    out = orthogonalize(G, coefficient_tensor(MUON), dtype=torch.bfloat16)
    assert relative_error(out, reference) < BF16_RTOL


@pytest.mark.slow
def test_compiled_tensor_path_does_not_recompile_for_new_coefficient_values(generator):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(orthogonalize, backend=counter, fullgraph=True)
    G = torch.randn(16, 24, generator=generator)
    for bump in (0.0, 0.01, -0.02):
        coefficients = coefficient_tensor(MUON) + torch.tensor([bump, -bump, bump / 2])
        out = compiled(G, coefficients)
        torch.testing.assert_close(out, orthogonalize(G, coefficients), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: orthogonalize(torch.ones(5), MUON),
            "orthogonalize needs a matrix or a batch of matrices (..., m, n), got shape (5,)",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 4), torch.ones(2, 4)),
            "coefficients must have shape (3,) or (k, 3), got (2, 4)",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 4), torch.ones(2, 3), steps=5),
            "steps=5 does not match the 2 coefficient rows given",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 4), [(1.0, 2.0)]),
            "coefficient row 0 must have 3 values (a, b, c), got 2: (1.0, 2.0)",
        ),
        (
            lambda: orthogonalize(torch.ones(4, 4), MUON, steps=0),
            "Newton–Schulz steps must be an integer >= 1, got 0",
        ),
        (lambda: Schedule(rows=((1.0, float("nan"), 0.0),)), "coefficient row 0 has a non-finite value"),
        (lambda: Schedule(rows=MUON.rows, scale=0.0), "Schedule scale must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_input_is_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_default_bf16_tracks_the_float64_cpu_reference(shape, generator):
    G = torch.randn(shape, generator=generator)
    reference = orthogonalize(G.double(), POLAR_EXPRESS, dtype=torch.float64)
    out = orthogonalize(G.cuda(), POLAR_EXPRESS)  # default on CUDA: bf16
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert relative_error(out.cpu(), reference) < BF16_RTOL
