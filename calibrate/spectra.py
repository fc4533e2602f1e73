"""Normalised singular values of (clipped) samples: the expensive step, computed once and cached.

Newton–Schulz acts on singular values only (docs/design.md §1), so after this step every candidate
coefficient set is scored in O(r) instead of O(K·m²·n). The spectrum is taken of what NS will see:
the sample clipped at the optimizer's quantile, divided by its Frobenius norm.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from root_core.files import write_atomically
from root_core.outliers import clip_to_quantile

from .determinism import deterministic

# Bump when the computation below changes, so stale cache entries are never read back.
# /2: computed on one thread (calibrate/determinism.py), so /1 entries may differ in the last bit.
SPECTRUM_METHOD = "gram-eigvalsh-float64/2"


def clipped(matrix: Tensor, clip_quantile: float | None, device: torch.device | str = "cpu") -> Tensor:
    """The matrix NS sees inside ROOT: clipped to ±(clip_quantile of |M|), or as is with ``None``."""
    matrix = matrix.to(device)
    return matrix if clip_quantile is None else clip_to_quantile(matrix, clip_quantile)


@deterministic  # eigvalsh's result depends on the thread count (calibrate/determinism.py)
def normalized_spectrum(matrix: Tensor, *, clip_quantile: float | None, device="cpu") -> Tensor:
    """σ_i / ‖B‖_F of B = clip(matrix), float64 on the CPU, descending.

    Gram + ``eigvalsh`` in float64: 11 s at 4096×11008 on 2 CPU cores against 30 s for ``svdvals``,
    agreeing to 1e-13 (docs/design.md §1). ‖B‖_F² is the Gram trace, i.e. the eigenvalue sum, so the
    normalisation is exactly the one NS applies.
    """
    B = clipped(matrix, clip_quantile, device).to(torch.float64)
    if B.shape[-2] > B.shape[-1]:
        B = B.mT
    eigenvalues = torch.linalg.eigvalsh(B @ B.mT).clamp(min=0.0)
    total = eigenvalues.sum(dim=-1, keepdim=True)
    sigma = (eigenvalues / torch.where(total > 0, total, torch.ones_like(total))).sqrt()
    return sigma.flip(-1).cpu()


class SpectrumCache:
    """Spectra on disk, keyed by the sample's bytes, the clip quantile and the method version.

    A re-fit with other search settings, or a second shape list that shares samples, then skips the
    eigen-decompositions. Files are written atomically, so an interrupted run leaves no bad entry.
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def spectrum(self, matrix: Tensor, *, clip_quantile: float | None, device="cpu") -> Tensor:
        if self.directory is None:
            self.misses += 1
            return normalized_spectrum(matrix, clip_quantile=clip_quantile, device=device)
        path = self.directory / f"{self._key(matrix, clip_quantile)}.npy"
        if path.exists():
            self.hits += 1
            return torch.from_numpy(np.load(path))
        self.misses += 1
        sigma = normalized_spectrum(matrix, clip_quantile=clip_quantile, device=device)
        self._write(path, sigma.numpy())
        return sigma

    @staticmethod
    def _key(matrix: Tensor, clip_quantile: float | None) -> str:
        digest = hashlib.sha256()
        digest.update(f"{SPECTRUM_METHOD}|{clip_quantile!r}|{tuple(matrix.shape)}|{matrix.dtype}".encode())
        digest.update(matrix.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    def _write(self, path: Path, values: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda stream: np.save(stream, values))
