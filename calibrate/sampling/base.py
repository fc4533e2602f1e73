"""What every sample source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

SampleKind = Literal["real", "synthetic"]


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One momentum-like matrix for one canonical shape.

    ``matrix`` is float32 on the CPU, oriented (min, max) — wide — since Newton–Schulz and the spectrum
    do not depend on orientation. ``source`` says where it came from in a form a user can follow
    ("synthetic:gaussian", "harvest:stdlib:mlp.up:step40", "file:/path/x.safetensors:layers.0.w");
    ``meta`` holds the details (seed, family parameters, step, layer, corpus) recorded in provenance.
    """

    matrix: Tensor
    kind: SampleKind
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m, n = self.matrix.shape[-2:]
        if self.matrix.ndim != 2:
            raise ValueError(f"sample {self.source} must be a matrix, got shape {tuple(self.matrix.shape)}")
        if m > n:
            object.__setattr__(self, "matrix", self.matrix.mT)
        object.__setattr__(self, "matrix", self.matrix.detach().to("cpu", torch.float32).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical (min, max) shape."""
        m, n = self.matrix.shape
        return (m, n)

    @property
    def has_matrix(self) -> bool:
        """Always; spectrum-only samples from ROOT's recordings (sampling/recorded.py) say False."""
        return True

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.matrix).all())
