"""The probe models and optimizers the harvester trains (``calibrate/sampling/harvest.py``).

A probe is "<family>-<optimizer>", e.g. ``llama-muon`` or ``gpt-adamw``. Every family is a one-block
byte-level causal LM whose hidden width is the short side a of the canonical shape (a, b), a ≤ b, and
whose MLP is b wide, so the block holds matrices of exactly that shape (in both orientations): those are
the *targets* whose momentum is recorded.

- ``llama``: RMSNorm before each sub-layer, separate q/k/v/o projections with rotary positions, SwiGLU
  MLP (gate and up b×a, down a×b).
- ``gpt``: learned positions, LayerNorm before each sub-layer, one fused QKV projection (3w×a), GELU
  MLP (fc b×a, proj a×b). GPT's own 4× MLP ratio is what an (a, 4a) shape gives; an (a, 3a) shape is
  also the fused QKV itself, which is then a target too.
- ``postln`` (calibration never trains it; the independent held-out set of ``benchmarks/precision.py``
  does): LayerNorm *after* each residual add, as in the original Transformer and BERT, grouped-query
  attention (k and v with a quarter of q's heads, as in Mistral-style models), ReLU MLP.
- ``parallel`` (calibration and the first independent set never train it; the second independent set
  does): the parallel block of GPT-J and PaLM, one LayerNorm whose output feeds attention and MLP side by
  side, both added to the residual; multi-query attention (k and v one head wide, as in PaLM), rotary
  positions, squared-ReLU MLP (Primer, modded-nanogpt).

Attention is w = a wide when the target is square (q/k/v/o are then a×a targets), else NARROW_WIDTH, so
what is not a target costs little next to the targets (the CPU budget of a harvest is mostly the targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import CalibrationError

__all__ = [
    "DEFAULT_PROBES",
    "FAMILIES",
    "HELD_OUT_PROBES",
    "OPTIMIZERS",
    "SECOND_HELD_OUT_PROBES",
    "SEQ_LEN",
    "VOCAB",
    "OptimizerConfig",
    "ProbeModel",
    "adamw_lr",
    "check_shape_fits",
    "hidden_matrix_shapes",
    "muon_flops",
    "parse_probe",
    "parse_probes",
    "probe_macs_per_token",
    "target_layers",
]

VOCAB = 256  # bytes
SEQ_LEN = 64  # bytes per training sequence
# Attention width where the target is not square: enough for the block to learn byte n-grams, and at
# 4096×11008 its q/k/v/o cost 0.6% of the MLP's matrices.
NARROW_WIDTH = 64
HEAD_DIM = 32  # per attention head (a narrower width w gives one head of w)
FAMILIES = ("llama", "gpt", "postln", "parallel")
# Rotary positions, where the others learn a position embedding: GPT-J and PaLM, which the parallel
# family stands for, both use rotary, so its attention sees positions as theirs does.
ROTARY_FAMILIES = ("llama", "parallel")


@dataclass(frozen=True)
class OptimizerConfig:
    """How a probe's hidden matrices are trained, and so which state matrix is recorded.

    ``kind`` "muon": torch.optim.Muon (``momentum`` = μ; the recorded matrix is what Muon orthogonalises:
    the Nesterov combination, or the buffer itself with ``nesterov`` off). "adamw": AdamW (``momentum`` =
    β1, ``beta2`` = β2; the recorded matrix is ``exp_avg``).
    """

    kind: str
    lr: float
    momentum: float
    nesterov: bool = True
    beta2: float = 0.95
    weight_decay: float = 0.0


OPTIMIZERS = {
    # torch.optim.Muon's defaults (momentum, Nesterov) and Keller Jordan's Muon lr; no decay, since short
    # runs from scratch would only get a second knob on the trajectory.
    "muon": OptimizerConfig("muon", lr=0.02, momentum=0.95),
    # The betas of most LLM recipes (GPT-3, LLaMA); lr 3e-3 is a common small-LM rate.
    "adamw": OptimizerConfig("adamw", lr=3e-3, momentum=0.9, beta2=0.95),
    # Held out (benchmarks/precision.py): what calibration never trains with. Muon without Nesterov at a
    # shorter momentum window, and AdamW at torch's own defaults (lr 1e-3, betas (0.9, 0.999), decay 0.01).
    "muon-plain": OptimizerConfig("muon", lr=0.02, momentum=0.9, nesterov=False),
    "adamw-torch": OptimizerConfig("adamw", lr=1e-3, momentum=0.9, beta2=0.999, weight_decay=0.01),
    # Held out a second time (benchmarks/precision.py --independent-set 2): settings neither calibration
    # nor the first independent set trains with. "muon-warm": modded-nanogpt's Muon (lr 0.05, Nesterov),
    # whose momentum warms up from 0.85 to 0.95 over its first 300 steps, held at 0.85: the shorter
    # window of early training. "adamw-fast": β1 0.8 as modded-nanogpt's Adam, β2 0.99 as nanoGPT's
    # small-model configs (few tokens per step, as here), GPT-3's weight decay 0.1, and lr 2e-3.
    "muon-warm": OptimizerConfig("muon", lr=0.05, momentum=0.85),
    "adamw-fast": OptimizerConfig("adamw", lr=2e-3, momentum=0.8, beta2=0.99, weight_decay=0.1),
}
# The calibration mix, in the order samples cycle through it: sample i is probe i mod 4, so any 2
# samples hold both families and both optimizers, and 4 hold every pair (harvest.record_plan).
DEFAULT_PROBES = ("llama-muon", "gpt-adamw", "gpt-muon", "llama-adamw")
HELD_OUT_PROBES = ("postln-muon-plain", "postln-adamw-torch")
SECOND_HELD_OUT_PROBES = ("parallel-muon-warm", "parallel-adamw-fast")


def parse_probe(name: str) -> tuple[str, str]:
    """``"llama-muon"`` → ("llama", "muon"); a clear error naming the bad probe otherwise."""
    family, _, optimizer = str(name).strip().partition("-")
    if family not in FAMILIES or optimizer not in OPTIMIZERS:
        pairs = ", ".join(f"{f}-{o}" for f in FAMILIES for o in ("muon", "adamw"))
        raise CalibrationError(
            f"invalid harvest probe {name!r}: expected FAMILY-OPTIMIZER with a family of "
            f"{', '.join(FAMILIES)} and an optimizer of {', '.join(OPTIMIZERS)}, e.g. {pairs}"
        )
    return family, optimizer


def parse_probes(probes: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """A comma-separated list or a sequence of probes, checked; ``None`` → DEFAULT_PROBES."""
    if probes is None:
        return DEFAULT_PROBES
    names = [p.strip() for p in probes.split(",")] if isinstance(probes, str) else list(probes)
    if not names or any(not n for n in names):
        raise CalibrationError(f"invalid harvest probes {probes!r}: expected a comma-separated list")
    for name in names:
        parse_probe(name)
    return tuple(names)


def _widths(family: str, a: int, b: int) -> tuple[int, int]:
    """(attention width w, MLP width f) of the family's probe for the canonical shape (a, b)."""
    square, fused = b == a, family == "gpt" and b == 3 * a
    return (a if square or fused else min(a, NARROW_WIDTH)), b


def _kv_heads(heads: int) -> int:
    """Grouped-query attention: a quarter of the query heads, rounded down to a divisor (≥ 1)."""
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    return kv


def _heads(width: int) -> int:
    return width // HEAD_DIM if width % HEAD_DIM == 0 else 1


def _kv_width(family: str, w: int) -> int:
    """Width of k and v: all heads (llama), one head (parallel: multi-query), else grouped-query."""
    head_dim = w // _heads(w)
    if family == "llama":
        return w
    if family == "parallel":
        return head_dim
    return _kv_heads(_heads(w)) * head_dim


def _matrix_shapes(family: str, a: int, b: int) -> dict[str, tuple[int, int]]:
    """Every hidden matrix of the probe, as (out, in) = nn.Linear's weight shape."""
    w, f = _widths(family, a, b)
    if family == "gpt":
        attention = {"attn.qkv": (3 * w, a), "attn.o": (a, w)}
    else:
        kv = _kv_width(family, w)
        attention = {"attn.q": (w, a), "attn.k": (kv, a), "attn.v": (kv, a), "attn.o": (a, w)}
    mlp = {"mlp.up": (f, a), "mlp.down": (a, f)}
    if family == "llama":
        mlp["mlp.gate"] = (f, a)
    return {**attention, **mlp}


def target_layers(family: str, shape: tuple[int, int]) -> tuple[str, ...]:
    """The probe's hidden matrices of exactly the canonical shape, in a fixed order (MLP first)."""
    a, b = shape
    matrices = _matrix_shapes(family, a, b)
    found = [name for name, (m, n) in matrices.items() if (min(m, n), max(m, n)) == (a, b)]
    # Up then down: consecutive records of one probe alternate between the two orientations.
    return tuple(sorted(found, key=lambda name: not name.startswith("mlp")))


def probe_macs_per_token(family: str, shape: tuple[int, int]) -> int:
    """Multiply-adds of one token's forward pass through the matrices (embedding lookup aside)."""
    a, b = shape
    matrices = sum(m * n for m, n in _matrix_shapes(family, a, b).values())
    return matrices + VOCAB * a  # + the byte head


def hidden_matrix_shapes(family: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """What a Muon-type optimizer orthogonalises every step (its Newton–Schulz cost)."""
    return list(_matrix_shapes(family, *shape).values())


def _rotary(x: Tensor) -> Tensor:
    """Rotary position embedding on (B, H, T, D), over the largest even part of D."""
    t, d = x.shape[-2], x.shape[-1] // 2 * 2
    if d == 0:
        return x
    frequencies = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)
    angles = torch.arange(t, device=x.device, dtype=x.dtype)[:, None] * frequencies
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0:d:2], x[..., 1:d:2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., d:]), dim=-1)


class ProbeModel(nn.Module):
    """One block of the family, between a byte embedding and a byte head (see the module docstring)."""

    def __init__(self, family: str, shape: tuple[int, int]) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise CalibrationError(f"invalid probe family {family!r}: expected one of {', '.join(FAMILIES)}")
        a, b = shape
        self.family = family
        self.heads = _heads(_widths(family, a, b)[0])
        norm = nn.RMSNorm if family == "llama" else nn.LayerNorm
        self.embed = nn.Embedding(VOCAB, a)
        self.position = nn.Embedding(SEQ_LEN, a) if family not in ROTARY_FAMILIES else None
        # The parallel block normalises once, for attention and MLP alike.
        self.norm_attn = norm(a)
        self.norm_mlp = norm(a) if family != "parallel" else None
        self.norm_out = norm(a)
        linears = {
            name: nn.Linear(n_in, n_out, bias=False)
            for name, (n_out, n_in) in _matrix_shapes(family, a, b).items()
        }
        self.attn = nn.ModuleDict({k.split(".")[1]: v for k, v in linears.items() if k.startswith("attn")})
        self.mlp = nn.ModuleDict({k.split(".")[1]: v for k, v in linears.items() if k.startswith("mlp")})
        self.head = nn.Linear(a, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # (B, T, a)
        if self.position is not None:
            h = h + self.position.weight[: tokens.shape[1]]
        if self.family == "postln":
            h = self.norm_attn(h + self._attention(h))
            h = self.norm_mlp(h + self._mlp(h))
            return self.head(self.norm_out(h))
        if self.family == "parallel":
            normalized = self.norm_attn(h)
            h = h + self._attention(normalized) + self._mlp(normalized)
            return self.head(self.norm_out(h))
        h = h + self._attention(self.norm_attn(h))
        h = h + self._mlp(self.norm_mlp(h))
        return self.head(self.norm_out(h))

    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, t, width = x.shape
        return x.view(b, t, heads, width // heads).transpose(1, 2)

    def _attention(self, h: Tensor) -> Tensor:
        if "qkv" in self.attn:
            q, k, v = self.attn["qkv"](h).chunk(3, dim=-1)
        else:
            q, k, v = (self.attn[name](h) for name in ("q", "k", "v"))
        head_dim = q.shape[-1] // self.heads
        kv_heads = k.shape[-1] // head_dim
        q, k, v = self._split(q, self.heads), self._split(k, kv_heads), self._split(v, kv_heads)
        if self.family in ROTARY_FAMILIES:
            q, k = _rotary(q), _rotary(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != self.heads)
        return self.attn["o"](out.transpose(1, 2).flatten(2))

    def _mlp(self, h: Tensor) -> Tensor:
        if self.family == "llama":
            return self.mlp["down"](F.silu(self.mlp["gate"](h)) * self.mlp["up"](h))
        if self.family == "parallel":
            return self.mlp["down"](F.relu(self.mlp["up"](h)).square())
        activation = F.gelu if self.family == "gpt" else F.relu
        return self.mlp["down"](activation(self.mlp["up"](h)))

    def hidden_matrices(self) -> dict[str, nn.Parameter]:
        """The block's 2-D weights (what Muon-family setups give Muon), by "attn.q"-style name."""
        return {
            f"{group}.{name}": layer.weight
            for group, modules in (("attn", self.attn), ("mlp", self.mlp))
            for name, layer in modules.items()
        }


def adamw_lr(config_lr: float, fan_in: int, width: int) -> float:
    """Adam moves every weight by about lr at once, so a layer's output moves by about lr·fan_in: above
    ``width`` the rate shrinks as 1/fan_in (as in muP)."""
    return config_lr * min(1.0, width / fan_in)


def muon_flops(shape: tuple[int, int], ns_steps: int) -> float:
    """One Muon step's Newton–Schulz on an m×n matrix: X·Xᵀ and the update times X (2m²n each), m³ terms."""
    m, n = min(shape), max(shape)
    return 2 * ns_steps * (4 * m * m * n + 2 * m**3)


def check_shape_fits(family: str, shape: tuple[int, int]) -> None:
    if not target_layers(family, shape):  # cannot happen with the MLP at b wide; guards future families
        raise CalibrationError(f"probe family {family!r} has no layer of shape {shape[0]}x{shape[1]}")
