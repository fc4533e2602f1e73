"""Quintic Newton–Schulz orthogonalisation: the pure math, apart from any optimizer.

One step maps X ↦ aX + b(XXᵀ)X + c(XXᵀ)²X, which acts on each singular value σ as
p(σ) = aσ + bσ³ + cσ⁵ and keeps the singular vectors (docs/design.md §1). A schedule is one (a, b, c) row
per step; the input is first normalised to X = G / max(scale·‖G‖_F, eps) so that every σ lies in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .schedule import DEFAULT_EPS, Schedule, as_schedule

# "standard" iterates on X (m×n); "gram" on the m×m Gram matrix (Dao-AILab/gram-newton-schulz).
NS_FORMS = ("standard", "gram")
# The Gram form restarts after every 2nd step; a lone last step joins the segment before it (it would
# cost as much as a standard step), so 5 steps restart once, after step 2, as Dao-AILab/gram-newton-schulz
# does. Without restarts, or with 3-step segments at the start, errors grew up to 10⁷× in bf16 on
# power-law spectra (measurements: benchmarks/RESULTS.md, issue 13).
GRAM_RESTART_EVERY = 2


def default_ns_dtype(device: torch.device | str, form: str = "standard") -> torch.dtype:
    """bf16 where tensor cores make it fast and Muon-family training uses it; float32 on the CPU.

    The Gram form gets fp16 on CUDA instead, as in Dao-AILab/gram-newton-schulz: its fp16 error
    (5 steps: ≤ 5.3e-3 on Gaussian, ≤ 1.8e-2 on power-law spectra) stays below the standard form's in bf16
    (1.1e-2, 1.1e-1), while its own bf16 error is up to 3.9× that (benchmarks/RESULTS.md, issue 13).
    """
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.float16 if form == "gram" else torch.bfloat16


def orthogonalize(
    G: Tensor,
    schedule: Schedule | Tensor | Sequence[Sequence[float]] | Sequence[float],
    *,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype | None = None,
    steps: int | None = None,
    form: str = "standard",
    restarts: Sequence[int] | None = None,
) -> Tensor:
    """Approximate the polar factor U Vᵀ of ``G`` (shape ``(..., m, n)``) with Newton–Schulz.

    ``schedule`` is a :class:`Schedule`, one ``(a, b, c)`` triple, a list of rows, or a ``(k, 3)`` /
    ``(3,)`` tensor. Python-number rows run through fused ``addmm`` (bit-identical to
    ``torch.optim.Muon`` in bf16); a tensor of rows runs a path whose coefficient values are data, so a
    compiled caller does not recompile when they change (fold the scale in with
    :func:`coefficient_tensor`). ``dtype`` is the iteration dtype (default bf16 on CUDA, float32 on CPU);
    the result has ``G``'s dtype and shape. Tall inputs are iterated transposed, since the Gram matrix
    of the short side is the cheap one.

    ``form="gram"`` runs the same polynomial steps on the m×m Gram matrix (:func:`gram_newton_schulz`),
    which saves flops when the long side is well over 1.5× the short one; ``restarts`` are the steps
    after which it recomputes the Gram matrix from X (default: :func:`default_gram_restarts`). It
    needs coefficient rows, not a tensor.
    """
    if G.ndim < 2:
        raise ValueError(
            f"orthogonalize needs a matrix or a batch of matrices (..., m, n), got shape {tuple(G.shape)}"
        )
    if form not in NS_FORMS:
        raise ValueError(f"Newton–Schulz form must be one of {NS_FORMS}, got {form!r}")
    work_dtype = dtype or default_ns_dtype(G.device, form)
    transpose = G.size(-2) > G.size(-1)
    X = G.mT if transpose else G
    if form == "gram":
        if isinstance(schedule, Tensor):
            raise ValueError("form='gram' takes coefficient rows (a Schedule or a list), not a tensor")
        plan = as_schedule(schedule)
        rows = plan.expanded(steps)
        X = gram_newton_schulz(
            _normalize(X, work_dtype, plan.scale, eps), rows, _restarts(restarts, len(rows))
        )
    elif isinstance(schedule, Tensor):
        coefficients = _check_coefficient_tensor(schedule, steps)
        X = newton_schulz_tensor(_normalize(X, work_dtype, 1.0, eps), coefficients)
    else:
        plan = as_schedule(schedule)
        X = newton_schulz(_normalize(X, work_dtype, plan.scale, eps), plan.expanded(steps))
    return (X.mT if transpose else X).to(G.dtype)


def coefficient_tensor(schedule: Schedule, steps: int | None = None, *, device=None) -> Tensor:
    """The schedule's rows as a float32 ``(steps, 3)`` tensor, with its input scale folded in.

    Scaling the input by s equals replacing the first row (a, b, c) by (a·s, b·s³, c·s⁵) (docs/design.md §1),
    so a scaled schedule needs no extra argument on the tensor path. The eps term then divides ‖G‖_F
    instead of scale·‖G‖_F, a difference of eps·(1 − 1/scale) in the denominator.
    """
    rows = torch.tensor(schedule.expanded(steps), dtype=torch.float64)
    s = 1.0 / schedule.scale
    rows[0] *= torch.tensor([s, s**3, s**5], dtype=torch.float64)
    return rows.to(dtype=torch.float32, device=device)


def newton_schulz(X: Tensor, rows: Sequence[tuple[float, float, float]]) -> Tensor:
    """Run the quintic steps on an already normalised, wide (m ≤ n) ``X`` of shape ``(..., m, n)``.

    ``addmm`` forms b·A + c·A² and a·X + B·X with one rounding each, which in bf16 measured 1.2%
    relative error against float64 where separate multiply-adds gave 2.5% (256×512 Gaussian).
    """
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:]) if X.ndim != 2 else X
    for a, b, c in rows:
        if X.ndim == 2:
            A = X @ X.mT
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        else:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X.reshape(*batch_shape, *X.shape[-2:])


def gram_newton_schulz(
    X: Tensor, rows: Sequence[tuple[float, float, float]], restarts: Sequence[int] = ()
) -> Tensor:
    """:func:`newton_schulz` iterated on the m×m Gram matrix of a normalised, wide ``X`` (..., m, n).

    A step is X ← W·X with W = aI + bA + cA², A = XXᵀ, so after k steps X_k = Q_k·X_0 with
    Q_k = W_{k−1}…W_0, and the Gram matrix follows without touching X: A_{k+1} = W_k·A_k·W_k. Only
    the first Gram matrix and the final Q·X_0 cost m²n each; every step in between is m×m work
    (four m³ products: A², Q·W and two for W·A·W; three fewer at a segment's ends). After each step
    listed in ``restarts`` X is formed and A recomputed from it, because A_k drifts from X_k X_kᵀ
    through rounding, amplified by up to a² per step on small singular values (recomputing A as
    Q·A₀·Q instead, m×m work only, measured 10⁴–10⁶× the standard form's error on power-law spectra:
    the restart has to go through X). In flops, a segment
    of L steps costs 4m²n + (8L − 6)m³ against 4Lm²n + 2Lm³ for the standard form: it wins once
    n > 1.5m, most when n ≫ m, and loses on square matrices.

    Numerics, with the default restarts, against float64 SVD (benchmarks/RESULTS.md, issue 13): on
    rectangular inputs the error is the standard form's in float32 (1.0–1.2× for 5 steps, ≤ 2× for 10),
    0.9–4.4× it in fp16 and 0.9–3.9× in bf16; fp16 Gram is still more accurate than bf16 standard NS,
    so use float32 or fp16 (bf16 has 8 bits to fp16's 11). On square inputs, where it saves nothing,
    2–20× (their σ reach down to 0). Without restarts, power-law spectra drift 12–12000× in float32 and
    overflow fp16.
    """
    batch_shape, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)
    identity = torch.eye(m, dtype=X.dtype, device=X.device)
    restart_after = set(restarts)
    A = torch.bmm(X, X.mT)
    Q: Tensor | None = None
    for k, (a, b, c) in enumerate(rows):
        Z = torch.baddbmm(A, A, A, beta=b, alpha=c)  # bA + cA²; W = aI + Z
        Q = Z + a * identity if Q is None else torch.baddbmm(Q, Q, Z, beta=a)  # Q·W = aQ + Q·Z
        if k + 1 == len(rows):
            break
        if k + 1 in restart_after:
            X = torch.bmm(Q, X)
            A, Q = torch.bmm(X, X.mT), None
        else:
            AW = torch.baddbmm(A, A, Z, beta=a)  # A·W
            A = torch.baddbmm(AW, Z, AW, beta=a)  # W·A·W
    X = torch.bmm(Q, X)
    return X.reshape(*batch_shape, m, n)


def default_gram_restarts(num_steps: int) -> tuple[int, ...]:
    """After steps 2, 4, …; a lone last step joins the segment before it, unless that is the first."""
    restarts = list(range(GRAM_RESTART_EVERY, num_steps, GRAM_RESTART_EVERY))
    if len(restarts) > 1 and num_steps - restarts[-1] == 1:
        restarts.pop()
    return tuple(restarts)


def _restarts(restarts: Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
    if restarts is None:
        return default_gram_restarts(num_steps)
    chosen = tuple(restarts)
    for step in chosen:
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step < num_steps:
            raise ValueError(f"Gram restarts must be steps in [1, {num_steps - 1}], got {step!r}")
    return chosen


def newton_schulz_tensor(X: Tensor, coefficients: Tensor) -> Tensor:
    """``newton_schulz`` with coefficients as a ``(k, 3)`` tensor, for ``torch.compile`` callers.

    The sums run in float32 so that a bf16 iteration does not round the coefficients to bf16
    (3.4445 would become 3.4375, which measured 4.2% error against float64 instead of 1.6%).
    """
    opmath = torch.promote_types(X.dtype, torch.float32)
    coefficients = coefficients.to(device=X.device, dtype=opmath)
    for k in range(coefficients.shape[0]):
        a, b, c = coefficients[k, 0], coefficients[k, 1], coefficients[k, 2]
        A = X @ X.mT
        B = (b * A.to(opmath) + c * (A @ A).to(opmath)).to(X.dtype)
        X = (a * X.to(opmath) + (B @ X).to(opmath)).to(X.dtype)
    return X


def _normalize(X: Tensor, dtype: torch.dtype, scale: float, eps: float) -> Tensor:
    """X / max(scale·‖X‖_F, eps) per matrix, computed in the iteration dtype.

    Casting first, dividing in that dtype and flooring the norm at eps (``clamp(min=eps)``) is what
    ``torch.optim.Muon`` does, so with scale 1 a bf16 run matches it bit for bit, tiny gradients too
    (an added eps differs from the floor by 13% of the update at ‖G‖ = 1e-8); torch's norm reductions
    accumulate bf16 in float32. eps keeps an all-zero matrix at zero instead of NaN.

    fp16 is the exception: its range ends at 65504 and its normal numbers at 6.1e-5, so casting first
    would turn large momentum entries into inf and typical ones (1e-5 and below) into subnormals or
    zeros. It is normalised in float32 and cast after, when every entry lies in [−1, 1].
    """
    if dtype == torch.float16:
        return _normalize(X, torch.float32, scale, eps).to(dtype)
    X = X.to(dtype)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    return X / (norm * scale).clamp(min=eps)


def _check_coefficient_tensor(coefficients: Tensor, steps: int | None) -> Tensor:
    if coefficients.ndim == 1:
        coefficients = coefficients.reshape(1, -1)
    if coefficients.ndim != 2 or coefficients.shape[-1] != 3 or coefficients.shape[0] == 0:
        raise ValueError(f"coefficients must have shape (3,) or (k, 3), got {tuple(coefficients.shape)}")
    if steps is not None and steps != coefficients.shape[0]:
        if coefficients.shape[0] != 1:
            raise ValueError(
                f"steps={steps} does not match the {coefficients.shape[0]} coefficient rows given"
            )
        coefficients = coefficients.expand(steps, 3)
    return coefficients
