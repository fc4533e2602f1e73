"""The last check: the real matrix iteration, in the working dtypes, against the exact polar factor.

The spectral identity holds in exact arithmetic only; bf16 on a GPU breaks it a little (docs/design.md §1),
so every fitted table is finally scored with ``orthogonalize`` itself, next to the baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from root_core import orthogonalize
from root_core.schedule import Schedule

from .spectra import clipped

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Below this σ_min/σ_max the Gram matrix's eigenvectors (σ² near float64's 1e-16 floor) are unreliable,
# so the polar factor comes from a full SVD instead.
GRAM_POLAR_MIN_CONDITION = 1e-6


def polar_factor(B: Tensor) -> Tensor:
    """Exact U Vᵀ of a wide matrix in float64.

    Well-conditioned (clipped) matrices use the Gram eigen-decomposition, U·diag(1/σ)·Uᵀ·B, about 3×
    cheaper than an SVD at 4096×11008; ill-conditioned ones take the SVD.
    """
    B = B.to(torch.float64)
    eigenvalues, U = torch.linalg.eigh(B @ B.mT)
    if eigenvalues[0] > (GRAM_POLAR_MIN_CONDITION**2) * eigenvalues[-1] > 0:
        return (U * eigenvalues.rsqrt()) @ (U.mT @ B)
    U, _, Vh = torch.linalg.svd(B, full_matrices=False)
    return U @ Vh


def relative_matrix_error(approximation: Tensor, polar: Tensor) -> float:
    """‖NS(B) − U Vᵀ‖_F / ‖U Vᵀ‖_F, the matrix counterpart of the spectral error."""
    return float((approximation.to(torch.float64) - polar).norm() / polar.norm())


def matrix_errors(
    matrices: Sequence[Tensor],
    schedules: Mapping[str, Schedule],
    *,
    clip_quantile: float | None,
    device: torch.device | str = "cpu",
    dtypes: Mapping[str, Sequence[str]] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """errors[label][dtype] = one relative error per matrix; ``dtypes[label]`` picks dtypes per schedule."""
    errors: dict[str, dict[str, list[float]]] = {label: {} for label in schedules}
    for matrix in matrices:
        B = clipped(matrix.to(torch.float32), clip_quantile, device)
        polar = polar_factor(B)
        for label, schedule in schedules.items():
            for dtype_name in (dtypes or {}).get(label, tuple(DTYPES)):
                result = orthogonalize(B, schedule, dtype=DTYPES[dtype_name])
                errors[label].setdefault(dtype_name, []).append(relative_matrix_error(result, polar))
        if advance is not None:
            advance(1)
    return errors
