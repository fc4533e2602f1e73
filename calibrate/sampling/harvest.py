"""The built-in harvester: real momentum from a byte-level language model trained with Muon.

For a canonical shape (a, b), a ≤ b, the model is

    bytes → embedding (256 × a) → causal depthwise mixing over the last CONTEXT bytes
          → MLP: up (b × a), GELU, down (a × b), residual → RMSNorm → head (a × 256)

so both MLP weights have exactly the requested shape, one in each orientation. They are trained with
``torch.optim.Muon``; everything else (embedding, mixing, norms, head) with AdamW, as Muon-family
optimizers do. At spaced steps we record, for each MLP weight, the matrix Muon feeds Newton–Schulz: the
Nesterov-combined momentum, raw (clipping comes later in the pipeline, as in the optimizer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from ..corpus import load_corpus
from ..determinism import deterministic
from ..errors import CalibrationError
from .base import Sample

__all__ = [
    "HARVEST_FORMAT",
    "ByteMLPModel",
    "HarvestResult",
    "HarvestRun",
    "harvest",
    "load_harvest",
    "nesterov_update",
    "record_schedule",
    "resolve_steps",
    "run_harvest",
    "save_harvest",
]

HARVEST_FORMAT = "root-calibrate-harvest/1"
VOCAB = 256  # bytes
# Bytes of left context the causal mixing sees: enough for byte n-gram statistics, cheap on any shape.
CONTEXT = 8
SEQ_LEN = 64  # bytes per training sequence; batch = tokens_per_step // SEQ_LEN sequences
# Tokens per step. Muon momentum sums rank-≤T gradients, so over its ~1/(1−μ) = 20-step window T·20
# should reach min(m, n) (4096 for the 7B MLP) for a full-rank sample; 512 does, and at 4096×11008 its
# forward/backward (~3 s on 2 CPU cores) stays small next to the Newton–Schulz of the update.
DEFAULT_TOKENS_PER_STEP = 512
# torch.optim.Muon's defaults (momentum, NS steps) and Keller Jordan's Muon lr; AdamW at a common LM rate.
MUON_LR = 0.02
MUON_MOMENTUM = 0.95
MUON_WEIGHT_DECAY = 0.0  # short runs from scratch: decay only adds a second knob to the trajectory
# The training update runs 3 NS steps, not Muon's 5: at 4096×11008 on 2 CPU cores the update's NS is
# 27 s per matrix at 5 steps and dominates the harvest (328 s for 4 samples); at 3 steps Muon's triple
# still lifts every σ ≥ 0.03 of the normalised momentum to O(1). The recorded matrix is the momentum
# itself, which the NS step count changes only through the training trajectory.
DEFAULT_NS_STEPS = 3
ADAMW_LR = 3e-3
ADAMW_BETAS = (0.9, 0.95)
# Adam moves every head weight by about lr at once, so the logits move by about lr·d_model per step:
# above this width the head's lr shrinks as 1/d_model (as in muP). Without it the loss at 4096×11008
# rose from 4.7 to 6.2 by step 5; at 2048×8192 it cut the 8-step loss from 3.71 to 3.41 and the
# step-5 bump from 4.55 to 4.08; at 1024×4096 the unscaled lr learned faster, hence 1024.
HEAD_LR_WIDTH = 1024
# Recording starts after this fraction of training, so the momentum window is full of real gradients.
# Half the run: the momentum window (~20 steps) is then full of gradients from a model that has started
# to learn, which is what momentum mid-training looks like (after 5 steps it is far worse conditioned).
WARMUP_FRACTION = 0.5
MIN_WARMUP_STEPS = 3
# Default run length: as many steps as fit the time budget on the reference machine (2 CPU cores),
# estimated from FLOPs so it is deterministic, then clamped.
MAX_DEFAULT_STEPS = 300
CPU_BUDGET_S = 120.0
# Measured on the reference 2-core AMD EPYC (Zen 4): a 4096×11008 Gram takes 5.8 s in float32 and
# 2.9 s in bfloat16 (torch.optim.Muon runs its NS in bfloat16).
CPU_FP32_FLOPS = 64e9
CPU_BF16_FLOPS = 127e9
TARGET_LAYERS = ("mlp.up", "mlp.down")
# How the target matrices are trained. "muon": torch.optim.Muon. "nesterov": the same momentum and
# Nesterov combination with the orthogonalisation replaced by a Frobenius normalisation to the same
# update norm, so a step costs its forward/backward only. Measured at 1024×4096 after 40 steps on the
# stdlib, the recorded momentum is equally conditioned either way (clipped at q=0.9: Muon's error 0.186
# vs 0.187, Polar Express's 0.097 vs 0.097), while the number of steps matters a lot (after 5 steps:
# 0.40 / 0.26). "auto" takes Muon when its steps fit the budget, so big shapes on a CPU get enough
# steps instead of too few exact ones.
TRAINERS = ("auto", "muon", "nesterov")
# Muon momentum averages over ~1/(1−μ) = 20 steps; "auto" wants at least this many within the budget.
AUTO_MUON_MIN_STEPS = 40
RESERVED_KEYS = ("format", "order")  # metadata entries that are not samples

ProgressFn = Callable[[int], None]


def nesterov_update(grad: Tensor, buf: Tensor, momentum: float) -> Tensor:
    """The matrix Muon orthogonalises this step, from the buffer *before* the step (not modified).

    Mirrors ``torch.optim.Muon``: ``buf.lerp_(grad, 1 − μ)`` then ``grad.lerp(buf, μ)``.
    """
    return grad.lerp(buf.lerp(grad, 1 - momentum), momentum)


class ByteMLPModel(nn.Module):
    """A causal byte-level LM whose MLP weights are d_ff × d_model and d_model × d_ff."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        # Depthwise: mixes time per channel at O(d·CONTEXT) cost, so no other d×d matrix is needed.
        self.mix = nn.Conv1d(d_model, d_model, CONTEXT, groups=d_model, bias=False)
        self.norm = nn.RMSNorm(d_model)
        self.mlp = nn.ModuleDict(
            {"up": nn.Linear(d_model, d_ff, bias=False), "down": nn.Linear(d_ff, d_model, bias=False)}
        )
        self.norm_out = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # (B, T, d)
        past = F.pad(h.transpose(1, 2), (CONTEXT - 1, 0))  # left padding only: causal
        h = h + self.mix(past).transpose(1, 2)
        h = h + self.mlp["down"](F.gelu(self.mlp["up"](self.norm(h))))
        return self.head(self.norm_out(h))


@dataclass(frozen=True)
class HarvestResult:
    samples: list[Sample]
    losses: list[float]  # training loss per step, step 1 first


def resolve_steps(
    shape: tuple[int, int],
    count: int,
    steps: int | None = None,
    *,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
) -> int:
    """Training steps a harvest runs (the progress total: ``progress`` advances once per step)."""
    a, b = _canonical(shape)
    _check_positive("harvest sample count", count)
    _check_positive("harvest tokens per step", tokens_per_step)
    _check_positive("harvest Newton–Schulz steps", ns_steps)
    if steps is not None:
        _check_positive("harvest steps", steps)
        return steps
    needed = MIN_WARMUP_STEPS + _record_step_count(count)
    if torch.device(device).type != "cpu":
        return max(MAX_DEFAULT_STEPS, needed)
    trainer = resolve_trainer(
        shape, trainer, device=device, tokens_per_step=tokens_per_step, ns_steps=ns_steps
    )
    step_seconds = _cpu_seconds_per_step(a, b, tokens_per_step, ns_steps if trainer == "muon" else 0)
    return max(min(int(CPU_BUDGET_S / step_seconds), MAX_DEFAULT_STEPS), needed)


def resolve_trainer(
    shape: tuple[int, int],
    trainer: str = "auto",
    *,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
) -> str:
    """ "auto" → "muon" on a GPU or when AUTO_MUON_MIN_STEPS Muon steps fit the CPU budget."""
    if trainer not in TRAINERS:
        raise CalibrationError(f"invalid harvest trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    if trainer != "auto":
        return trainer
    if torch.device(device).type != "cpu":
        return "muon"
    a, b = _canonical(shape)
    muon_seconds = AUTO_MUON_MIN_STEPS * _cpu_seconds_per_step(a, b, tokens_per_step, ns_steps)
    return "muon" if muon_seconds <= CPU_BUDGET_S else "nesterov"


def _cpu_seconds_per_step(a: int, b: int, tokens: int, ns_steps: int) -> float:
    forward_backward = 6 * tokens * (2 * a * b + 2 * VOCAB * a)
    # Muon's NS per step on an a×b matrix: X·Xᵀ and the update times X (2a²b flops each), a³ terms.
    newton_schulz = 2 * ns_steps * (4 * a * a * b + 2 * a**3)
    return forward_backward / CPU_FP32_FLOPS + newton_schulz / CPU_BF16_FLOPS


class NormalizedNesterov(torch.optim.Optimizer):
    """Muon without the orthogonalisation: Muon's momentum and Nesterov step, Frobenius-normalised.

    The update has Muon's Frobenius norm sqrt(min(m, n)) and lr rule, so the weights move as far per
    step; only the direction differs (the momentum itself instead of its polar factor).
    """

    def __init__(self, params, lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])
                rows, cols = p.shape
                scale = math.sqrt(min(rows, cols)) / update.norm().clamp(min=1e-12)
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)) * float(scale))


def record_schedule(total_steps: int, count: int) -> list[int]:
    """Steps to record at: evenly spaced from the end of warm-up to the last step (1-based)."""
    records = _record_step_count(count)
    # Warm-up gives way to recorded steps when a run is short, down to MIN_WARMUP_STEPS.
    warmup = max(MIN_WARMUP_STEPS, min(round(total_steps * WARMUP_FRACTION), total_steps - records))
    first = warmup + 1
    if total_steps - first + 1 < records:
        raise CalibrationError(
            f"harvest steps {total_steps} are too few for {count} samples: need at least "
            f"{MIN_WARMUP_STEPS + records} ({MIN_WARMUP_STEPS} warm-up + {records} recorded)"
        )
    if records == 1:
        return [total_steps]
    gap = (total_steps - first) / (records - 1)
    return [first + round(i * gap) for i in range(records)]


def _record_step_count(count: int) -> int:
    return math.ceil(count / len(TARGET_LAYERS))


def _canonical(shape: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    )
    if not ok:
        raise CalibrationError(f"harvest shape must be two positive integers, got {shape!r}")
    return (min(shape), max(shape))


def _check_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{what} must be a positive integer, got {value!r}")


class HarvestRun:
    """One training run: a fresh seeded model, its optimizers and its data order, stepped one at a time."""

    def __init__(
        self,
        shape: tuple[int, int],
        corpus: bytes,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
        ns_steps: int = DEFAULT_NS_STEPS,
        trainer: str = "muon",
    ) -> None:
        a, b = _canonical(shape)
        if len(corpus) < SEQ_LEN + 1:
            raise CalibrationError(f"corpus too short: {len(corpus)} bytes, need at least {SEQ_LEN + 1}")
        self.device = torch.device(device)
        self.batch = max(1, tokens_per_step // SEQ_LEN)
        self.data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(self.device)
        # The data order has its own generator, and the init its own forked global RNG, so a harvest
        # neither depends on nor disturbs the caller's random state.
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ByteMLPModel(a, b).to(self.device)
        self.targets = {name: self.model.get_submodule(name).weight for name in TARGET_LAYERS}
        self.muon, self.adamw = self._optimizers(ns_steps, trainer)
        self.step_count = 0

    def _optimizers(self, ns_steps: int, trainer: str) -> tuple[torch.optim.Optimizer, torch.optim.AdamW]:
        """Muon (or its normalised twin) for the targets, AdamW for the rest, as Muon-family setups do."""
        hidden = list(self.targets.values())
        if trainer == "muon":
            muon = torch.optim.Muon(
                hidden, lr=MUON_LR, momentum=MUON_MOMENTUM, weight_decay=MUON_WEIGHT_DECAY, ns_steps=ns_steps
            )
        else:
            muon = NormalizedNesterov(hidden, lr=MUON_LR, momentum=MUON_MOMENTUM)
        head = self.model.head.weight
        rest = [p for p in self.model.parameters() if all(p is not q for q in [*hidden, head])]
        head_lr = ADAMW_LR * min(1.0, HEAD_LR_WIDTH / head.shape[1])
        groups = [{"params": rest}, {"params": [head], "lr": head_lr}]
        return muon, torch.optim.AdamW(groups, lr=ADAMW_LR, betas=ADAMW_BETAS)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(self.data) - SEQ_LEN, (self.batch,), generator=self.generator)
        index = starts.to(self.device)[:, None] + torch.arange(SEQ_LEN + 1, device=self.device)
        window = self.data[index].long()
        return window[:, :-1], window[:, 1:]

    def step(self, record: bool = False) -> tuple[float, dict[str, Tensor]]:
        """One training step; returns its loss and, if ``record``, each target's Nesterov update."""
        inputs, targets = self.next_batch()
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad(set_to_none=True)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        updates = self._nesterov_updates() if record else {}
        self.muon.step()
        self.adamw.step()
        self.step_count += 1
        return float(loss.detach()), updates

    @torch.no_grad()
    def _nesterov_updates(self) -> dict[str, Tensor]:
        updates = {}
        for name, param in self.targets.items():
            buf = self.muon.state[param].get("momentum_buffer")
            buf = torch.zeros_like(param) if buf is None else buf  # Muon's buffer starts at zero
            updates[name] = nesterov_update(param.grad, buf, MUON_MOMENTUM).cpu()
        return updates


@deterministic  # bit-identical samples at any thread count or CPU load (calibrate/determinism.py)
def run_harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | None = None,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
    progress: ProgressFn | None = None,
) -> HarvestResult:
    """Train from scratch and record ``count`` Nesterov-combined momentum matrices of ``shape``.

    Two per recorded step (``mlp.up`` then ``mlp.down``), at steps spread from the end of warm-up to
    the last step (:func:`record_schedule`). Same seed, corpus and settings give identical matrices
    on the same device. ``progress(1)`` is called after every training step.
    """
    trainer = resolve_trainer(
        shape, trainer, device=device, tokens_per_step=tokens_per_step, ns_steps=ns_steps
    )
    total = resolve_steps(
        shape,
        count,
        steps,
        device=device,
        tokens_per_step=tokens_per_step,
        ns_steps=ns_steps,
        trainer=trainer,
    )
    schedule = set(record_schedule(total, count))
    text, description = load_corpus(corpus)
    run = HarvestRun(
        shape,
        text,
        seed=seed,
        device=device,
        tokens_per_step=tokens_per_step,
        ns_steps=ns_steps,
        trainer=trainer,
    )
    context = {
        "corpus": description,
        "seed": seed,
        "lr": MUON_LR,
        "momentum": MUON_MOMENTUM,
        "ns_steps": ns_steps,
        "trainer": trainer,
        "tokens_per_step": run.batch * SEQ_LEN,
    }
    samples: list[Sample] = []
    losses: list[float] = []
    for step in range(1, total + 1):
        loss, updates = run.step(record=step in schedule)
        losses.append(loss)
        for layer, matrix in updates.items():
            if len(samples) < count:
                samples.append(_sample(matrix, layer, step, loss, context))
        if progress is not None:
            progress(1)
    return HarvestResult(samples=samples, losses=losses)


def harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | None = None,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
    progress: ProgressFn | None = None,
) -> list[Sample]:
    """The samples of :func:`run_harvest` (which also returns the loss curve)."""
    settings = {
        "tokens_per_step": tokens_per_step,
        "ns_steps": ns_steps,
        "trainer": trainer,
        "progress": progress,
    }
    return run_harvest(shape, count, seed=seed, corpus=corpus, steps=steps, device=device, **settings).samples


def cached_harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | None,
    steps: int,
    device: str | torch.device,
    folder: Path | None,
    progress: ProgressFn | None = None,
) -> list[Sample]:
    """:func:`harvest`, read back from ``folder`` when the same harvest ran before (``None``: no cache).

    The file name covers everything a harvest depends on (shape, count, steps, seed, device type and the
    corpus bytes), so a cached file is exactly what a new harvest would record.
    """

    def record() -> list[Sample]:
        return harvest(shape, count, seed=seed, corpus=corpus, steps=steps, device=device, progress=progress)

    if folder is None:
        return record()
    text, _ = load_corpus(corpus)
    identity = json.dumps([HARVEST_FORMAT, list(shape), count, steps, seed, torch.device(device).type])
    path = folder / f"{hashlib.sha256(identity.encode() + text).hexdigest()[:32]}.safetensors"
    if path.exists():
        if progress is not None:
            progress(steps)
        return load_harvest(path)
    samples = record()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_harvest(samples, path, overwrite=True)
    return samples


def _sample(matrix: Tensor, layer: str, step: int, loss: float, context: dict[str, Any]) -> Sample:
    a, b = (min(matrix.shape), max(matrix.shape))
    meta = {"shape": [a, b], "step": step, "layer": layer, "loss": loss, **context}
    source = f"harvest:{context['corpus']}:{layer}:step{step}"
    return Sample(matrix=matrix, kind="real", source=source, meta=meta)


def save_harvest(samples: list[Sample], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write samples to one safetensors file, atomically; each tensor's meta is JSON in ``__metadata__``."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise CalibrationError(f"harvest file {str(target)!r} exists; pass overwrite=True to replace it")
    if not target.parent.is_dir():
        raise CalibrationError(f"harvest folder {str(target.parent)!r} does not exist")
    if not samples:
        raise CalibrationError("no samples to save")
    tensors, metadata = _serialise(samples)
    _atomic_save(tensors, metadata, target)
    return target


def _serialise(samples: list[Sample]) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    metadata = {}
    for sample in samples:
        key = _key(sample, tensors)
        tensors[key] = sample.matrix
        metadata[key] = json.dumps({**sample.meta, "source": sample.source, "kind": sample.kind})
    # safetensors does not keep insertion order, so the sample order travels in the metadata.
    return tensors, {"format": HARVEST_FORMAT, "order": json.dumps(list(tensors)), **metadata}


def _key(sample: Sample, taken: dict[str, Tensor]) -> str:
    meta = sample.meta
    base = f"{meta['layer']}.step{meta['step']}" if "layer" in meta and "step" in meta else "sample"
    key, n = base, 1
    while key in taken or key in RESERVED_KEYS:  # samples of several harvests may share layer and step
        key, n = f"{base}.{n}", n + 1
    return key


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], target: Path) -> None:
    # A temporary file in the same folder, then os.replace: readers see the old file or the whole new one.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_harvest(path: str | Path) -> list[Sample]:
    """Read a file written by :func:`save_harvest` back into samples, in file order."""
    source = Path(path)
    if not source.is_file():
        raise CalibrationError(f"harvest file {str(path)!r} does not exist")
    try:
        with safe_open(source, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != HARVEST_FORMAT:
                raise CalibrationError(f"{str(path)!r} is not a harvest file (format {HARVEST_FORMAT})")
            order = json.loads(metadata["order"])
            return [_loaded(handle.get_tensor(key), json.loads(metadata[key])) for key in order]
    except CalibrationError:
        raise
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise CalibrationError(f"cannot read harvest file {str(path)!r}: {error}") from error


def _loaded(matrix: Tensor, meta: dict[str, Any]) -> Sample:
    source = meta.pop("source")
    kind = meta.pop("kind", "real")
    return Sample(matrix=matrix, kind=kind, source=source, meta=meta)
