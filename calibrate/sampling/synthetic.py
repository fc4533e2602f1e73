"""Seeded synthetic momentum: families of matrices whose parameters vary per sample.

Each sample draws its parameters and entries from its own ``torch.Generator``, seeded from
(seed, shape, family, index) through a hash. So a sample is bit-identical whatever else is drawn, in
whatever order: drawing 3 or 6 samples gives the same first 3, and a re-run with the same seed gives the
same table. Matrices are built in the canonical (min, max) orientation.

The families cover the spectra a fit must not overfit away from (docs/design.md §1.2: the spectrum's shape
is what Newton–Schulz sees): a noise bulk (Marchenko–Pastur), entry outliers (Student-t, which the
soft-threshold clips), nearly low-rank momentum with a power-law decay, and per-feature magnitudes as
Adam/Muon momentum has.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from root_core.tables import canonical_shape

from ..errors import CalibrationError
from .base import Sample

Shape = tuple[int, int]
FamilyFn = Callable[[Shape, torch.Generator], tuple[Tensor, dict[str, Any]]]

# Absolute entry scale, log-uniform. Newton–Schulz normalises by ‖X‖_F, so scale only matters against the
# normalisation eps (~1e-7); this range keeps ‖X‖_F far above it at every shape while covering the small
# magnitudes momentum has in practice.
SCALE_RANGE = (1e-4, 1e-1)
# Student-t degrees of freedom: 1.5 has infinite variance (real outliers), 6 is close to Gaussian.
DF_RANGE = (1.5, 6.0)
# The power-law family is matched to harvested momentum *after* the optimizer's clip at q=0.9: at
# 1024×4096 its σ_k/σ_1 fall as k^(−1.08) over most of the rank down to a floor of ~3e-3 (10th
# percentile 7e-2, median 1.6e-2). So: exponent α of σ_k ∝ k^(−α) around 1, a power law over a
# quarter to all of the rank, and a noise floor. With the earlier ranges (rank ≤ r/4, α up to 2.5,
# noise 1e-3–1e-1) three quarters of σ sat below 1e-4, Polar Express's error on them was 0.5–0.8
# against 0.10 on real momentum, and a 1:3 fit did worse on held-out real momentum (0.051 against
# 0.041 with these ranges; shared triple 0.203 against 0.181, Muon 0.185).
ALPHA_RANGE = (0.7, 1.3)
# Rank as a fraction of min(m, n), drawn log-uniformly.
RANK_FRACTION_RANGE = (1 / 4, 1.0)
# Noise Frobenius norm relative to the low-rank part's, log-uniform: the floor of the spectrum.
NOISE_LEVEL_RANGE = (1e-2, 2e-1)
# Standard deviation of log row / column scales: exp(0.1·z) is nearly flat, exp(1.0·z) spans ~400× over ±3σ.
LOG_SCALE_STD_RANGE = (0.1, 1.0)
# Above this many entries, Student-t mixing variances come from a pool of this many independent Gamma draws
# (indexed at random per entry) instead of one Gamma draw per entry: torch's Gamma sampler runs
# single-threaded, ~3.4 s for 4096×11008 on 2 cores, against ~0.4 s for the pool. Each entry keeps its own
# Gaussian factor, so entries stay distinct; only the mixing law is an empirical one of 4M draws.
GAMMA_POOL_SIZE = 1 << 22
# Domain tag in the seed hash, so these streams never coincide with another module's seeded streams.
_SEED_TAG = "root-calibrate/synthetic/v1"


def sample_generator(seed: int, shape: Shape, family: str, index: int) -> torch.Generator:
    """A generator that depends only on (seed, canonical shape, family, index)."""
    m, n = canonical_shape(shape)
    text = f"{_SEED_TAG}:{seed}:{m}x{n}:{family}:{index}"
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return low + (high - low) * u


def _log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(generator, math.log(low), math.log(high)))


def gaussian(shape: Shape, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """I.i.d. N(0, s²): singular values fill the Marchenko–Pastur bulk s·(√n ± √m)."""
    scale = _log_uniform(generator, *SCALE_RANGE)
    matrix = torch.randn(shape, generator=generator).mul_(scale)
    return matrix, {"scale": scale}


def _student_t_scales(df: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of 1/√(W/ν), W ~ χ²_ν: the per-entry scales that turn Gaussians into Student-t."""
    size = min(count, GAMMA_POOL_SIZE)
    # χ²_ν / ν = Gamma(ν/2, 1)·2/ν; the scale is taken on the pool, before the per-entry gather.
    gamma = torch._standard_gamma(torch.full((size,), df / 2), generator=generator)
    scales = gamma.mul_(2 / df).clamp_(min=torch.finfo(torch.float32).tiny).rsqrt_()
    if size == count:
        return scales
    index = torch.randint(size, (count,), generator=generator, dtype=torch.int32)
    return scales.index_select(0, index)


def heavy_tailed(shape: Shape, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """I.i.d. Student-t entries s·Z/√(W/ν): the outliers the soft-threshold clips."""
    scale = _log_uniform(generator, *SCALE_RANGE)
    df = _uniform(generator, *DF_RANGE)
    mixing = _student_t_scales(df, shape[0] * shape[1], generator).view(shape)
    matrix = torch.randn(shape, generator=generator).mul_(mixing).mul_(scale)
    return matrix, {"scale": scale, "df": df}


def _cholesky_of_gram(factor: Tensor) -> Tensor:
    """Lower L with L·Lᵀ = FᵀF, so F·L⁻ᵀ has orthonormal columns (Cholesky QR).

    Far cheaper than Householder QR of a tall Gaussian F, and accurate here: F has k ≤ rows/4 columns,
    so its condition number is at most ~3 and the Gram's ~9.
    """
    return torch.linalg.cholesky((factor.mT @ factor).double())


def low_rank_noise(shape: Shape, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """U·diag(σ)·Vᵀ with σ_k = s·k^(−α), plus Gaussian noise: nearly low-rank, like raw momentum."""
    m, n = shape
    scale = _log_uniform(generator, *SCALE_RANGE)
    alpha = _uniform(generator, *ALPHA_RANGE)
    low, high = (max(1, round(m * f)) for f in RANK_FRACTION_RANGE)
    rank = min(high, max(low, round(_log_uniform(generator, low, high))))
    noise_level = _log_uniform(generator, *NOISE_LEVEL_RANGE)

    sigma = scale * torch.arange(1, rank + 1, dtype=torch.float64).pow(-alpha)
    left = torch.randn(m, rank, generator=generator)
    right = torch.randn(n, rank, generator=generator)
    # U = left·Lu⁻ᵀ and V = right·Lv⁻ᵀ are orthonormal, so U·diag(σ)·Vᵀ = left·core·rightᵀ with the small
    # k×k core Lu⁻ᵀ·diag(σ)·Lv⁻¹ (two triangular solves); the one large product (2mnk flops) dominates.
    lower_left, lower_right = _cholesky_of_gram(left), _cholesky_of_gram(right)
    core = torch.linalg.solve_triangular(lower_right, torch.diag(sigma), upper=False, left=False)
    core = torch.linalg.solve_triangular(lower_left.mT, core, upper=True)
    noise_std = noise_level * float(sigma.norm()) / math.sqrt(m * n)
    noise = torch.randn(m, n, generator=generator).mul_(noise_std)
    matrix = torch.addmm(noise, left @ core.float(), right.mT)
    params = {"scale": scale, "alpha": alpha, "rank": rank, "noise_level": noise_level}
    return matrix, params


def row_col_scaled(shape: Shape, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
    """Gaussian times log-normal per-row and per-column scales: per-feature magnitudes, as in Adam/Muon."""
    m, n = shape
    scale = _log_uniform(generator, *SCALE_RANGE)
    row_std = _uniform(generator, *LOG_SCALE_STD_RANGE)
    col_std = _uniform(generator, *LOG_SCALE_STD_RANGE)
    rows = torch.randn(m, 1, generator=generator).mul_(row_std).exp_()
    cols = torch.randn(1, n, generator=generator).mul_(col_std).exp_()
    matrix = torch.randn(m, n, generator=generator).mul_(rows).mul_(cols).mul_(scale)
    return matrix, {"scale": scale, "row_log_std": row_std, "col_log_std": col_std}


FAMILIES: dict[str, FamilyFn] = {
    "gaussian": gaussian,
    "heavy_tailed": heavy_tailed,
    "low_rank_noise": low_rank_noise,
    "row_col_scaled": row_col_scaled,
}


# The default mix, one family per sample index, repeating: three quarters power-law momentum, one twelfth
# each of the i.i.d. families. Why not an even cycle: harvested momentum after the clip is nearly low-rank
# (σ_k/σ_1 ~ k^(-0.8…-1.3) down to a floor of 1e-4–3e-3, which low_rank_noise matches), while the i.i.d.
# families' Marchenko–Pastur bulks are well conditioned at rectangular shapes (σ_min/σ_max = 1/3 at
# 2048×8192). With three quarters of the synthetic samples i.i.d., a 1:3 fit served them first. Fits of
# 3 harvested + 9 synthetic spectra scored on held-out momentum (harvest seed 1, torch sources, 6 matrices),
# per-step / shared, against Polar Express / Muon:
#   2048×3072:  even cycle 0.330 / 0.454, this mix 0.320 / 0.419; PE 0.329, Muon 0.453
#   4096×11008: 2/3 power-law 0.369 / 0.457, this mix 0.364 / 0.447; PE 0.380, Muon 0.532
#   2048×16384: even cycle 0.135 / 0.352, 2/3 power-law 0.115 / 0.232; PE 0.122, Muon 0.271
# Every family stays in the mix, so the fit still sees outlier entries, per-feature scales and an MP bulk.
DEFAULT_MIX = (
    "low_rank_noise",
    "gaussian",
    "low_rank_noise",
    "low_rank_noise",
    "heavy_tailed",
    "low_rank_noise",
    "low_rank_noise",
    "low_rank_noise",
    "row_col_scaled",
    "low_rank_noise",
    "low_rank_noise",
    "low_rank_noise",
)


def family_cycle(families: Sequence[str] | None = None) -> list[str]:
    """The families sample indices cycle through: ``families`` as given (a repeated name weighs more), or
    the default mix."""
    return list(DEFAULT_MIX) if families is None else _check_families(families)


def family_at(index: int, families: Sequence[str] | None = None) -> str:
    """The family of synthetic sample ``index``, the same for any sample count above it."""
    cycle = family_cycle(families)
    return cycle[index % len(cycle)]


def _check_families(families: Sequence[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    choices = ", ".join(FAMILIES)
    if not names:
        raise CalibrationError(f"no synthetic families given; choose from {choices}")
    for name in names:
        if name not in FAMILIES:
            raise CalibrationError(f"unknown synthetic family {name!r}; choose from {choices}")
    return names


def synthetic_sample(shape: Sequence[int], index: int, *, seed: int, family: str) -> Sample:
    """Sample ``index`` of ``family`` at ``shape``; the same arguments give a bit-identical matrix."""
    (name,) = _check_families([family])
    canonical = canonical_shape(shape)
    generator = sample_generator(seed, canonical, name, index)
    matrix, params = FAMILIES[name](canonical, generator)
    meta = {"family": name, "params": params, "seed": seed, "index": index}
    return Sample(matrix=matrix, kind="synthetic", source=synthetic_source(name), meta=meta)


def synthetic_source(family: str) -> str:
    """A synthetic sample's ``source``: the validation split reads the family back (``synthetic_family``),
    and ``torchrun`` ranks name samples this way before making them."""
    return f"synthetic:{family}"


def synthetic_family(sample) -> str | None:
    """A synthetic sample's family from its source ("synthetic:low_rank_noise"); None for any other."""
    prefix, _, rest = str(sample.source).partition(":")
    return rest.split(":")[0] if sample.kind == "synthetic" and prefix == "synthetic" else None


def synthetic_samples(
    shape: Sequence[int], count: int, *, seed: int, families: Sequence[str] | None = None
) -> list[Sample]:
    """``count`` samples, cycling through ``families`` (default: the mix ``DEFAULT_MIX``)."""
    names = family_cycle(families)
    if count < 0:
        raise CalibrationError(f"synthetic sample count must be >= 0, got {count}")
    try:
        canonical = canonical_shape(shape)
    except ValueError as error:
        raise CalibrationError(str(error)) from None
    return [synthetic_sample(canonical, i, seed=seed, family=names[i % len(names)]) for i in range(count)]
