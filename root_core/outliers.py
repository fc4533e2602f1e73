"""Soft-thresholding of momentum outliers, ROOT's second robustness mechanism.

With ε the p-quantile of |M|, the outliers are O = T_ε(M) = sign(M)·max(|M| − ε, 0) and the base that
Newton–Schulz sees is B = M − O, which is M clipped to [−ε, ε].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The ROOT paper's threshold quantile (He et al. 2025, arXiv 2511.20626; reference example_train.py).
DEFAULT_OUTLIER_QUANTILE = 0.9
# Above this many elements per matrix the threshold comes from a banded selection (exact, ~5× faster
# than kthvalue at 45M elements); below it one batched kthvalue is cheaper than the bookkeeping.
BANDED_SELECTION_MIN_ELEMENTS = 1 << 18
SAMPLE_SIZE = 1 << 16
# The sample quantile's rank has standard deviation sqrt(q(1−q)/S) ≈ 0.0012 at q = 0.9, S = 2¹⁶;
# 8 of them make a miss (and the fallback) vanishingly rare for any data not built to defeat it.
BAND_SIGMAS = 8.0


def soft_threshold(M: Tensor, quantile: float = DEFAULT_OUTLIER_QUANTILE) -> tuple[Tensor, Tensor]:
    """Split ``M`` (shape ``(..., m, n)``) into ``(base, outliers)`` with ``base + outliers == M``.

    ε is the ``quantile`` of |M| over each trailing matrix, so a batch is thresholded matrix by matrix,
    exactly as one matrix at a time would be.
    """
    base = clip_to_quantile(M, quantile)
    return base, M - base


def clip_to_quantile(M: Tensor, quantile: float = DEFAULT_OUTLIER_QUANTILE) -> Tensor:
    """Only the base of :func:`soft_threshold` (what the optimizer feeds NS), without the outliers."""
    epsilon = abs_quantile(M, quantile)
    return torch.clamp(M, min=-epsilon, max=epsilon)


def abs_quantile(M: Tensor, quantile: float) -> Tensor:
    """The ``quantile`` of |M| per trailing matrix, shaped ``(..., 1, 1)`` to broadcast against M.

    Exact at every size, with ``torch.quantile``'s linear interpolation: the value at rank
    h = q·(N − 1) is lerp(x_(⌊h⌋), x_(⌊h⌋+1), h − ⌊h⌋), with h formed in float64. ``torch.quantile``
    itself refuses inputs above 2²⁴ elements (4096×11008 is 45M), and a full ``kthvalue`` selection
    there costs 0.86 s on 2 CPU cores; large matrices therefore go through :func:`_banded_order_statistics`
    (0.17 s, same result). Deterministic. Computed in float32 or wider, cast back to M's dtype.
    """
    _check_quantile(quantile)
    if M.ndim < 2:
        raise ValueError(f"soft_threshold needs a matrix or a batch of matrices, got shape {tuple(M.shape)}")
    flat = M.detach().reshape(-1, M.shape[-2] * M.shape[-1]).abs()
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    rank = quantile * (flat.shape[-1] - 1)
    k, fraction = math.floor(rank), rank - math.floor(rank)
    if flat.shape[-1] >= BANDED_SELECTION_MIN_ELEMENTS:
        pairs = [_banded_order_statistics(row, k, M.shape[-1]) for row in flat]
        lower = torch.stack([pair[0] for pair in pairs]).unsqueeze(-1)
        upper = torch.stack([pair[1] for pair in pairs]).unsqueeze(-1)
    else:
        lower = flat.kthvalue(k + 1, dim=-1, keepdim=True).values
        upper = _next_order_statistic(flat, lower, k) if fraction > 0.0 else lower
    threshold = torch.lerp(lower, upper, fraction)  # the formula torch.quantile uses, to the bit
    return threshold.reshape(*M.shape[:-2], 1, 1).to(M.dtype)


def _banded_order_statistics(values: Tensor, k: int, row_length: int) -> tuple[Tensor, Tensor]:
    """Exact x_(k), x_(k+1) (0-based order statistics) of a large 1-D tensor, without a full selection.

    A strided sample brackets rank k by [lo, hi] with BAND_SIGMAS standard deviations of the sample
    quantile to spare; one pass counts the values below lo and one pass keeps those in [lo, hi] (about
    2% of them); the order statistics are then selected inside that band. If the band misses rank k —
    possible only for adversarial data — the full selection runs instead, so the result is always exact.
    The stride is coprime with the row length so the sample visits every column, not a few.
    """
    count = values.numel()
    stride = max(1, count // SAMPLE_SIZE)
    while math.gcd(stride, row_length) != 1:
        stride += 1
    lo, hi = _bracket(values[::stride], k / max(count - 1, 1))
    below_mask = values < lo
    below = int(torch.count_nonzero(below_mask))
    band = values[(values <= hi) ^ below_mask]  # lo <= v <= hi, given that v < lo implies v <= hi
    top = min(k + 1, count - 1)
    if not below <= k or top >= below + band.numel():
        full = values.kthvalue(k + 1).values
        return full, _next_order_statistic(values, full, k).squeeze(-1) if top > k else full
    lower = band.kthvalue(k - below + 1).values
    upper = band.kthvalue(top - below + 1).values
    return lower, upper


def _bracket(sample: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Values of the sorted sample BAND_SIGMAS standard deviations either side of its q-quantile."""
    sample = sample.sort().values
    last = sample.numel() - 1
    margin = BAND_SIGMAS * math.sqrt(q * (1 - q) / sample.numel()) + 2.0 / sample.numel()
    return sample[max(0, math.floor((q - margin) * last))], sample[min(last, math.ceil((q + margin) * last))]


def _next_order_statistic(flat: Tensor, lower: Tensor, lower_index: int) -> Tensor:
    """x_(k+1) given x_(k) = ``lower``: equal to it when ties reach past rank k, else the next larger."""
    ties_reach = (flat <= lower).sum(dim=-1, keepdim=True) > lower_index + 1
    above = flat.masked_fill(flat <= lower, math.inf).amin(dim=-1, keepdim=True)
    return torch.where(ties_reach, lower, above)


def _check_quantile(quantile: float) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"outlier quantile must be a number in [0, 1], got {quantile!r}")
