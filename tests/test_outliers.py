"""soft_threshold: the exact quantile at every size, batched with no host sync, and base + outliers = M."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import SHAPES

from root_core.outliers import abs_quantile, clip_to_quantile, soft_threshold

# The threshold is an exact order statistic interpolated in float32: it can differ from numpy's float64
# interpolation only by the rounding of that one multiply-add, ≤ 1 float32 ulp (6e-8 relative).
THRESHOLD_RTOL = 2e-7
# torch.quantile forms the rank q·(N − 1) in float32, so its interpolation weight is off by up to
# ~1e-5 for N in the hundreds; ours is formed in float64.
TORCH_QUANTILE_RTOL = 1e-5
TORCH_QUANTILE_LIMIT = 2**24  # torch.quantile raises above this many elements (torch 2.13)
QUANTILES = [0.0, 0.5, 0.9, 0.975, 1.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quantile", QUANTILES)
def test_threshold_is_the_exact_quantile_per_matrix(shape, quantile, generator):
    M = torch.randn(shape, generator=generator)
    flat = M.abs().reshape(*shape[:-2], -1)
    exact = torch.from_numpy(np.asarray(np.quantile(flat.double().numpy(), quantile, axis=-1)))
    actual = abs_quantile(M, quantile).reshape(exact.shape)
    torch.testing.assert_close(actual.double(), exact, rtol=THRESHOLD_RTOL, atol=0)
    torch.testing.assert_close(
        actual, torch.quantile(flat, quantile, dim=-1), rtol=TORCH_QUANTILE_RTOL, atol=0
    )


@pytest.mark.parametrize("quantile", [0.1, 0.5, 0.6, 0.9])
def test_ties_interpolate_like_torch_quantile(quantile):
    M = torch.tensor([[1.0, -1.0, 1.0, 2.0, -3.0, 3.0, 3.0, 0.0]])
    expected = torch.quantile(M.abs().flatten(), quantile)
    torch.testing.assert_close(abs_quantile(M, quantile).flatten()[0], expected, rtol=THRESHOLD_RTOL, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_base_plus_outliers_is_the_input_and_outliers_are_the_soft_threshold(shape, generator):
    M = torch.randn(shape, generator=generator, dtype=torch.float64) ** 3  # heavy tails: real outliers
    base, outliers = soft_threshold(M, 0.9)
    epsilon = abs_quantile(M, 0.9)
    torch.testing.assert_close(base + outliers, M, rtol=1e-15, atol=0)  # one float64 rounding
    torch.testing.assert_close(
        outliers, torch.sign(M) * torch.clamp(M.abs() - epsilon, min=0), rtol=0, atol=0
    )
    assert (base.abs() <= epsilon).all()
    torch.testing.assert_close(clip_to_quantile(M, 0.9), base, rtol=0, atol=0)
    # 10% of entries sit above the 0.9-quantile, give or take the interpolated one.
    fraction_clipped = (outliers != 0).double().mean(dim=(-2, -1))
    assert ((fraction_clipped - 0.1).abs() <= 1.0 / M.shape[-1] / M.shape[-2] + 1e-12).all()


def structured_matrices(generator):
    """Matrices with the structure real momentum has, and ties that a selection must count right."""
    m, n = 520, 700
    gaussian = torch.randn(m, n, generator=generator)
    column_scaled = gaussian * torch.logspace(-3, 2, n)  # per-column scales, as in real momentum
    low_rank = torch.randn(m, 4, generator=generator) @ torch.randn(4, n, generator=generator)
    sparse = gaussian * (torch.rand(m, n, generator=generator) < 0.05)  # 95% exact zeros: ties at q=0.9
    steps = torch.randint(0, 5, (m, n), generator=generator).float()  # five values only: all ties
    return {
        "gaussian": gaussian,
        "column-scaled": column_scaled,
        "low-rank": low_rank,
        "sparse": sparse,
        "steps": steps,
    }


@pytest.mark.parametrize("kind", ["gaussian", "column-scaled", "low-rank", "sparse", "steps"])
@pytest.mark.parametrize("quantile", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_selection_is_exact_on_structured_matrices(kind, quantile, generator):
    M = structured_matrices(generator)[kind]
    exact = np.quantile(M.abs().double().numpy(), quantile)
    assert abs_quantile(M, quantile).item() == pytest.approx(exact, rel=THRESHOLD_RTOL, abs=0)


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.9, 1.0])
def test_a_stack_is_thresholded_as_its_matrices_one_by_one(quantile, generator):
    M = torch.stack(list(structured_matrices(generator).values()))
    per_matrix = torch.cat([abs_quantile(matrix, quantile).flatten() for matrix in M])
    assert torch.equal(abs_quantile(M, quantile).flatten(), per_matrix)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1, 3)])
@pytest.mark.parametrize("quantile", [0.0, 0.5, 1.0])
def test_tiny_matrices_select_within_range(shape, quantile, generator):
    """N = 1, 2, 3: the shorter side of rank k can be the whole matrix or a single value."""
    M = torch.randn(shape, generator=generator)
    expected = torch.quantile(M.abs().reshape(*shape[:-2], -1), quantile, dim=-1)
    torch.testing.assert_close(abs_quantile(M, quantile).reshape(expected.shape), expected)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(24, 40), (2, 512, 520)])  # 266k elements: past the old 2^18 cut
def test_threshold_compiles_into_one_graph(shape, generator):
    """fullgraph=True fails on any graph break, and a host sync (``.item()``, a data-dependent shape,
    a Python branch on a tensor) is one: this is the CPU proof that the threshold never syncs."""
    torch._dynamo.reset()
    compiled = torch.compile(clip_to_quantile, fullgraph=True, dynamic=False)
    M = torch.randn(shape, generator=generator) ** 3
    torch.testing.assert_close(compiled(M, 0.9), clip_to_quantile(M, 0.9), rtol=0, atol=0)


@pytest.mark.slow
def test_exact_beyond_torch_quantile_limit_and_deterministic(generator):
    M = torch.randn(4100, 4100, generator=generator)  # 16.8M elements, just past 2**24
    assert M.numel() > TORCH_QUANTILE_LIMIT
    with pytest.raises(RuntimeError):
        torch.quantile(M.abs().flatten(), 0.9)
    expected = np.quantile(M.abs().numpy().astype(np.float64), 0.9)
    first = abs_quantile(M, 0.9)
    assert first.item() == pytest.approx(expected, rel=THRESHOLD_RTOL)
    assert torch.equal(first, abs_quantile(M, 0.9))


def test_bf16_input_is_thresholded_in_float32_and_returned_in_bf16(generator):
    M = torch.randn(32, 48, generator=generator).bfloat16()
    base, outliers = soft_threshold(M)
    assert base.dtype == outliers.dtype == torch.bfloat16
    assert (base.abs() <= abs_quantile(M, 0.9)).all()


def test_zero_matrix_has_zero_threshold_and_no_outliers():
    base, outliers = soft_threshold(torch.zeros(6, 9))
    assert torch.equal(base, torch.zeros(6, 9)) and torch.equal(outliers, torch.zeros(6, 9))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: soft_threshold(torch.ones(4, 4), 1.5),
            "outlier quantile must be a number in [0, 1], got 1.5",
        ),
        (
            lambda: soft_threshold(torch.ones(4, 4), -0.1),
            "outlier quantile must be a number in [0, 1], got -0.1",
        ),
        (
            lambda: soft_threshold(torch.ones(4, 4), "0.9"),
            "outlier quantile must be a number in [0, 1], got '0.9'",
        ),
        (
            lambda: soft_threshold(torch.ones(4), 0.9),
            "soft_threshold needs a matrix or a batch of matrices, got shape (4,)",
        ),
    ],
)
def test_bad_input_is_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 96), (700, 600), (2, 520, 700), (1024, 4096)])
def test_cuda_threshold_equals_the_cpu_one_without_a_host_sync(shape, generator):
    M = torch.randn(shape, generator=generator) ** 3
    on_device = M.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any op that waits for the device raises
    try:
        base, outliers = soft_threshold(on_device, 0.9)
        threshold = abs_quantile(on_device, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(threshold.cpu(), abs_quantile(M, 0.9), rtol=THRESHOLD_RTOL, atol=0)
    torch.testing.assert_close((base + outliers).cpu(), M)
