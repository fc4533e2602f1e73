"""The real:synthetic ratio, and the calibration/validation split.

Real momentum is what the fit must serve; synthetic families keep it from overfitting the few real spectra
(docs/design.md §1.2). ``--ratio R:S`` sets how many of each a shape gets, and the validation set keeps both
kinds so the check reports on each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import CalibrationError
from .base import Sample
from .synthetic import synthetic_family

Ratio = tuple[int, int]

DEFAULT_RATIO: Ratio = (1, 3)
DEFAULT_VALIDATION_FRACTION = 0.25
_RATIO_PATTERN = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")
_KINDS = ("real", "synthetic")


def _ratio_error(text: object) -> CalibrationError:
    return CalibrationError(
        f"invalid ratio {text!r}: expected R:S with two non-negative integers, not both 0, e.g. 1:3"
    )


def parse_ratio(text: str) -> Ratio:
    """``"R:S"`` (real:synthetic) → (R, S); ``"0:1"`` is synthetic only and ``"1:0"`` real only."""
    match = _RATIO_PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise _ratio_error(text)
    ratio = (int(match[1]), int(match[2]))
    if ratio == (0, 0):
        raise _ratio_error(text)
    return ratio


def _check_ratio(ratio: Ratio | str) -> Ratio:
    if isinstance(ratio, str):
        return parse_ratio(ratio)
    parts = tuple(ratio)
    valid = len(parts) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in parts)
    if not valid or sum(parts) == 0:
        raise _ratio_error(":".join(map(str, parts)))
    return (parts[0], parts[1])


def split_counts(total: int, ratio: Ratio | str) -> tuple[int, int]:
    """(n_real, n_synthetic) summing to ``total``, by largest remainder (a tie goes to real).

    With ``total`` ≥ 2, each side with a non-zero ratio gets at least one sample, so "1:15" of 8 still
    sees real momentum.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise CalibrationError(f"sample count must be a non-negative integer, got {total!r}")
    real_part, synthetic_part = _check_ratio(ratio)
    # Exact integer arithmetic: real's quota is total·R/(R+S) = n_real + remainder/(R+S). With two sides
    # the synthetic remainder is the complement, so real takes the leftover sample when its share is ≥ half.
    n_real, remainder = divmod(total * real_part, real_part + synthetic_part)
    if remainder and 2 * remainder >= real_part + synthetic_part:
        n_real += 1
    if total >= 2:
        if real_part and n_real == 0:
            n_real = 1
        if synthetic_part and n_real == total:
            n_real = total - 1
    return n_real, total - n_real


def _validation_count(size: int, fraction: float) -> int:
    """Round half up, then keep at least one on each side when the group has two or more."""
    if size < 2:
        return 0
    return min(size - 1, max(1, int(size * fraction + 0.5)))


def _chosen_for_validation(size: int, count: int, seed: int, kind: str) -> set[int]:
    generator = torch.Generator().manual_seed(seed * len(_KINDS) + _KINDS.index(kind))
    return set(torch.randperm(size, generator=generator)[:count].tolist())


def _spare_and_firsts(members: list[int], samples: Sequence) -> tuple[list[int], list[int]]:
    """The members split into those validation draws from first (``spare``) and each synthetic family's
    first sample (``firsts``), which validation takes only when the spare ones are too few. So calibration
    fits every family the mix holds. Why: the default mix holds one gaussian, one heavy-tailed and one
    row/col-scaled sample per 12, and a kind-only split at seed 0 put the first two in validation: 16-sample
    runs then validated on well-conditioned spectra the fit never saw, which made validation easy at
    rectangular shapes and lost fitted rows to the baseline at square ones (qwen 896×896, llama 2048×2048
    and 4096×4096; benchmarks/RESULTS.md, "The validation split")."""
    firsts, seen = [], set()
    for i in members:
        family = synthetic_family(samples[i])
        if family is not None and family not in seen:
            seen.add(family)
            firsts.append(i)
    return [i for i in members if i not in firsts], firsts


def _drawn(members: list[int], samples: Sequence, count: int, seed: int, kind: str) -> list[int]:
    """``count`` members for validation, seeded: from the spare ones, then (if too few) from the firsts."""
    spare, firsts = _spare_and_firsts(members, samples)
    if len(spare) >= count:
        return [spare[i] for i in _chosen_for_validation(len(spare), count, seed, kind)]
    rest = _chosen_for_validation(len(firsts), count - len(spare), seed, kind)
    return spare + [firsts[i] for i in rest]


def train_validation_split(
    samples: Sequence[Sample], validation_fraction: float = DEFAULT_VALIDATION_FRACTION, *, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(calibration, validation), stratified by kind, in the input order within each.

    Each kind with ≥ 2 samples lands in both sets; with ≥ 2 samples in all, validation is never empty.
    Each synthetic family's first sample stays in calibration where the kind has enough others to
    validate on (``_spare_and_firsts``). The choice depends only on ``seed``, each kind's sample count
    and the synthetic samples' families (their ``source``), so it can be made before the matrices exist.
    """
    if not 0 < validation_fraction < 1:
        raise CalibrationError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    groups = {kind: [i for i, s in enumerate(samples) if s.kind == kind] for kind in _KINDS}
    counts = {kind: _validation_count(len(members), validation_fraction) for kind, members in groups.items()}
    if len(samples) >= 2 and not any(counts.values()):
        # Only singletons (one real, one synthetic): validate on the synthetic one and fit on real momentum.
        counts["synthetic"] = 1
    validation: set[int] = set()
    for kind, members in groups.items():
        validation.update(_drawn(members, samples, counts[kind], seed, kind))
    calibration = [s for i, s in enumerate(samples) if i not in validation]
    return calibration, [s for i, s in enumerate(samples) if i in validation]


def reject_non_finite(samples: Sequence[Sample]) -> list[Sample]:
    """The samples unchanged, or an error naming the first one with NaN or Inf."""
    for sample in samples:
        if not sample.is_finite():
            raise CalibrationError(f"sample {sample.source} contains NaN or Inf; remove it or fix its source")
    return list(samples)
