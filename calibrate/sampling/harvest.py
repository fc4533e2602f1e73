"""The built-in harvester: real momentum from small byte-level language models, across their training.

For a canonical shape (a, b), a ≤ b, every *probe* (``calibrate/sampling/probes.py``) is a one-block
byte-level LM of width a whose MLP is b wide, so it holds layers of exactly that shape. A harvest trains
probes of two families (LLaMA-style: separate q/k/v, SwiGLU; GPT-style: fused QKV, GELU) with two
optimizers from scratch on text, and records, at an early, a middle and a late step, the matrix the
optimizer holds for one of those layers, raw (clipping comes later in the pipeline, as in ROOT):

- Muon-trained probes (``torch.optim.Muon`` on the block's 2-D weights, AdamW on the embedding, norms
  and head, as Muon-family setups do): the matrix Muon feeds Newton–Schulz, the Nesterov-combined
  momentum (or the buffer itself, with Nesterov off);
- AdamW-trained probes: AdamW's ``exp_avg``, the momentum a user switching from AdamW brings.

Which probe and phase each sample gets is :func:`record_plan`. Every probe is its own run, trained only
up to its last recorded step, so early snapshots cost a few steps.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from torch.nn import functional as F

from root_core.files import write_atomically

from ..determinism import deterministic
from ..errors import CalibrationError
from .base import Sample
from .corpus import load_corpus
from .probes import (
    DEFAULT_PROBES,
    OPTIMIZERS,
    SEQ_LEN,
    VOCAB,
    ProbeModel,
    adamw_lr,
    hidden_matrix_shapes,
    muon_flops,
    parse_probe,
    parse_probes,
    probe_macs_per_token,
    target_layers,
)

__all__ = [
    "HARVEST_FORMAT",
    "PHASES",
    "HarvestResult",
    "HarvestRun",
    "Record",
    "cached_harvest",
    "harvest",
    "harvest_key",
    "load_harvest",
    "nesterov_update",
    "phase_steps",
    "record_plan",
    "resolve_steps",
    "resolve_trainer",
    "run_harvest",
    "save_harvest",
]

HARVEST_FORMAT = "root-calibrate-harvest/1"
# Tokens per step. Muon momentum sums rank-≤T gradients, so over its ~1/(1−μ) = 20-step window T·20
# should reach min(m, n) (4096 for the 7B MLP) for a full-rank sample; 512 does, and at 4096×11008 its
# forward/backward (~3 s on 2 CPU cores) stays small next to the Newton–Schulz of the update.
DEFAULT_TOKENS_PER_STEP = 512
MUON_MOMENTUM = OPTIMIZERS["muon"].momentum
# The training update runs 3 NS steps, not Muon's 5: at 4096×11008 on 2 CPU cores the update's NS is
# 27 s per matrix at 5 steps and dominates the harvest (328 s for 4 samples); at 3 steps Muon's triple
# still lifts every σ ≥ 0.03 of the normalised momentum to O(1). The recorded matrix is the momentum
# itself, which the NS step count changes only through the training trajectory.
DEFAULT_NS_STEPS = 3
# What Muon-trained probes give AdamW (embedding, norms, head): a common LM rate and betas.
ADAMW_LR = 3e-3
ADAMW_BETAS = (0.9, 0.95)
# Adam moves every weight by about lr at once, so a layer's output moves by about lr·fan_in per step:
# above this fan-in its lr shrinks as 1/fan_in (as in muP). Without it the loss at 4096×11008 rose from
# 4.7 to 6.2 by step 5; at 2048×8192 it cut the 8-step loss from 3.71 to 3.41 and the step-5 bump from
# 4.55 to 4.08; at 1024×4096 the unscaled lr learned faster, hence 1024.
HEAD_LR_WIDTH = 1024
# Training phases, in the order samples take them (record_plan): one sample is an early snapshot, two
# are early + late, three or more hold all three.
PHASES = ("early", "late", "mid")
# Early: the first 2% of the run, where real momentum is worst conditioned (its small-σ tail is deepest),
# but at least MIN_EARLY_STEP, so the momentum sums a few gradients. Middle: half-way. Late: the last step.
EARLY_FRACTION = 0.02
MID_FRACTION = 0.5
MIN_EARLY_STEP = 3
MIN_HARVEST_STEPS = MIN_EARLY_STEP + 2  # early < mid < late
# Default run length: as many steps as fit the time budget on the reference machine (2 CPU cores),
# estimated from FLOPs so it is deterministic, then clamped.
MAX_DEFAULT_STEPS = 300
CPU_BUDGET_S = 120.0
# Measured on the reference 2-core AMD EPYC (Zen 4): a 4096×11008 Gram takes 5.8 s in float32 and
# 2.9 s in bfloat16 (torch.optim.Muon runs its NS in bfloat16).
CPU_FP32_FLOPS = 64e9
CPU_BF16_FLOPS = 127e9
# What a probe's step costs beyond its matrix FLOPs (elementwise work: SwiGLU, attention, norms, the
# optimizer), relative to the byte-MLP probe these FLOP rates were set with, so that the budget means the
# same wall time as before. Measured at 2048×5504 on the reference CPU (1 thread, 3 steps after the first,
# the normalised twin): byte-MLP 1.89 s/step, gpt 2.20, llama 3.51 (gpt-adamw 1.94, llama-adamw 3.79),
# against 1.00, 1.00 and 1.48× its FLOPs. postln is costed as gpt (the same GELU-type MLP and attention),
# and so is parallel (one up and one down matrix, an elementwise activation; not measured).
# Building a probe (0.3 s) and its first step (within 10% of the next) add nothing worth a term.
FAMILY_COST_FACTOR = {"gpt": 1.17, "llama": 1.26, "postln": 1.17, "parallel": 1.17}
# How Muon-trained probes are trained. "muon": torch.optim.Muon. "nesterov": a stand-in with the same
# momentum and Nesterov combination and the orthogonalisation replaced by a Frobenius normalisation to
# the same update norm, so a step costs its forward/backward only. Measured at 1024×4096 after 40 steps
# on the stdlib, the recorded momentum is equally conditioned either way (clipped at q=0.9: Muon's error
# 0.186 vs 0.187, Polar Express's 0.097 vs 0.097), while the number of steps matters a lot (after 5
# steps: 0.40 / 0.26). "auto" takes Muon when its steps fit the budget, so big shapes on a CPU get
# enough steps instead of too few exact ones.
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


@dataclass(frozen=True)
class HarvestResult:
    samples: list[Sample]
    losses: dict[str, list[float]]  # training loss per step of each probe's run, step 1 first


@dataclass(frozen=True)
class Record:
    """One sample of a harvest: which probe's run records which layer at which step (of which phase)."""

    probe: str
    phase: str
    step: int
    layer: str


def phase_steps(total: int) -> dict[str, int]:
    """The early, middle and late step of a ``total``-step run (1-based, distinct)."""
    if total < MIN_HARVEST_STEPS:
        raise CalibrationError(
            f"harvest steps {total} are too few: need at least {MIN_HARVEST_STEPS} "
            "(distinct early, middle and late snapshots)"
        )
    early = max(MIN_EARLY_STEP, round(total * EARLY_FRACTION))
    mid = min(max(early + 1, round(total * MID_FRACTION)), total - 1)
    return {"early": early, "mid": mid, "late": total}


def record_plan(
    shape: tuple[int, int], total: int, count: int, probes: Sequence[str] = DEFAULT_PROBES
) -> list[Record]:
    """Sample i: probe i mod len(probes), phase PHASES[i mod 3], at that phase's step of a ``total``-step run.

    With the 4 default probes, 4 samples hold both families, both optimizers and every phase, and 12 hold
    every (probe, phase) pair. The layer rotates through the probe's layers of the shape (up, down, …);
    a sample whose probe, step and layer are all taken moves one step earlier.
    """
    steps = phase_steps(total)
    taken: set[tuple[str, int, str]] = set()
    plan = []
    for i in range(count):
        probe, phase = probes[i % len(probes)], PHASES[i % len(PHASES)]
        layers = target_layers(parse_probe(probe)[0], _canonical(shape))
        rotated = [layers[(i + j) % len(layers)] for j in range(len(layers))]
        step = steps[phase]
        while all((probe, step, layer) in taken for layer in rotated):
            step -= 1
            if step < 1:
                raise CalibrationError(f"harvest of {count} samples does not fit {total} steps")
        layer = next(layer for layer in rotated if (probe, step, layer) not in taken)
        taken.add((probe, step, layer))
        plan.append(Record(probe, phase, step, layer))
    return plan


def _run_lengths(plan: list[Record]) -> dict[str, int]:
    """Each probe's run, in order of first use, and the step it trains to (its last record)."""
    lengths: dict[str, int] = {}
    for record in plan:
        lengths[record.probe] = max(lengths.get(record.probe, 0), record.step)
    return lengths


def _step_seconds(probe: str, shape, tokens: int, ns_steps: int, trainer: str) -> float:
    family, optimizer = parse_probe(probe)
    flops = 6 * tokens * probe_macs_per_token(family, shape)
    seconds = flops * FAMILY_COST_FACTOR[family] / CPU_FP32_FLOPS
    if OPTIMIZERS[optimizer].kind == "muon" and trainer == "muon":
        seconds += sum(muon_flops(m, ns_steps) for m in hidden_matrix_shapes(family, shape)) / CPU_BF16_FLOPS
    return seconds


def _plan_seconds(shape, total: int, count: int, probes, tokens: int, ns_steps: int, trainer: str) -> float:
    """Estimated CPU seconds of a harvest: each probe's run, to its last record."""
    lengths = _run_lengths(record_plan(shape, total, count, probes))
    return sum(steps * _step_seconds(p, shape, tokens, ns_steps, trainer) for p, steps in lengths.items())


def resolve_steps(
    shape: tuple[int, int],
    count: int,
    steps: int | None = None,
    *,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
    probes: Sequence[str] | str | None = None,
) -> int:
    """The nominal run length: the late snapshot's step (the phases' steps are :func:`phase_steps`).

    On a CPU, the longest run (≤ MAX_DEFAULT_STEPS) whose runs together fit CPU_BUDGET_S by FLOPs.
    """
    a, b = _canonical(shape)
    _check_positive("harvest sample count", count)
    _check_positive("harvest tokens per step", tokens_per_step)
    _check_positive("harvest Newton–Schulz steps", ns_steps)
    probes = parse_probes(probes)
    if steps is not None:
        _check_positive("harvest steps", steps)
        phase_steps(steps)
        return steps
    if torch.device(device).type != "cpu":
        return MAX_DEFAULT_STEPS
    trainer = resolve_trainer(
        shape,
        trainer,
        count=count,
        device=device,
        tokens_per_step=tokens_per_step,
        ns_steps=ns_steps,
        probes=probes,
    )
    candidates = range(MIN_HARVEST_STEPS, MAX_DEFAULT_STEPS + 1)
    # The cost grows with the run length, so the budget's last fitting length is a bisection away.
    fits = bisect.bisect_right(
        candidates,
        CPU_BUDGET_S,
        key=lambda t: _plan_seconds((a, b), t, count, probes, tokens_per_step, ns_steps, trainer),
    )
    return candidates[max(fits - 1, 0)]


def resolve_trainer(
    shape: tuple[int, int],
    trainer: str = "auto",
    *,
    count: int = len(DEFAULT_PROBES),
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    probes: Sequence[str] | str | None = None,
) -> str:
    """ "auto" → "muon" on a GPU, or when the harvest's runs fit the CPU budget at AUTO_MUON_MIN_STEPS
    steps with real Muon; else the "nesterov" stand-in."""
    if trainer not in TRAINERS:
        raise CalibrationError(f"invalid harvest trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    if trainer != "auto":
        return trainer
    if torch.device(device).type != "cpu":
        return "muon"
    probes = parse_probes(probes)
    seconds = _plan_seconds(
        _canonical(shape), AUTO_MUON_MIN_STEPS, count, probes, tokens_per_step, ns_steps, "muon"
    )
    return "muon" if seconds <= CPU_BUDGET_S else "nesterov"


class NormalizedNesterov(torch.optim.Optimizer):
    """Muon without the orthogonalisation: Muon's momentum and Nesterov step, Frobenius-normalised.

    The update has Muon's Frobenius norm sqrt(min(m, n)) and lr rule, so the weights move as far per
    step; only the direction differs (the momentum itself instead of its polar factor).
    """

    def __init__(self, params, lr: float, momentum: float, nesterov: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                rows, cols = p.shape
                scale = math.sqrt(min(rows, cols)) / update.norm().clamp(min=1e-12)
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)) * float(scale))


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
    """One probe's training run: a fresh seeded model, its optimizers and data order, stepped singly."""

    def __init__(
        self,
        shape: tuple[int, int],
        corpus: bytes,
        *,
        seed: int,
        probe: str = DEFAULT_PROBES[0],
        device: str | torch.device = "cpu",
        tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
        ns_steps: int = DEFAULT_NS_STEPS,
        trainer: str = "muon",
    ) -> None:
        a, b = _canonical(shape)
        if len(corpus) < SEQ_LEN + 1:
            raise CalibrationError(f"corpus too short: {len(corpus)} bytes, need at least {SEQ_LEN + 1}")
        family, optimizer = parse_probe(probe)
        self.config = OPTIMIZERS[optimizer]
        self.device = torch.device(device)
        self.batch = max(1, tokens_per_step // SEQ_LEN)
        self.data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(self.device)
        # The data order has its own generator, and the init its own forked global RNG, so a harvest
        # neither depends on nor disturbs the caller's random state.
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ProbeModel(family, (a, b)).to(self.device)
        self.hidden = self.model.hidden_matrices()
        self.targets = {name: self.hidden[name] for name in target_layers(family, (a, b))}
        self.optimizers = self._optimizers(ns_steps, trainer)
        self.step_count = 0

    def _optimizers(self, ns_steps: int, trainer: str) -> list[torch.optim.Optimizer]:
        """Muon (or its stand-in) for the block's matrices and AdamW for the rest, or AdamW for all."""
        config, hidden = self.config, list(self.hidden.values())
        head = self.model.head.weight
        rest = [p for p in self.model.parameters() if all(p is not q for q in [*hidden, head])]
        head_group = {"params": [head], "lr": adamw_lr(ADAMW_LR, head.shape[1], HEAD_LR_WIDTH)}
        if config.kind == "adamw":
            groups = [{"params": [p], "lr": adamw_lr(config.lr, p.shape[1], HEAD_LR_WIDTH)} for p in hidden]
            groups += [
                {"params": rest, "lr": config.lr},
                {**head_group, "lr": adamw_lr(config.lr, head.shape[1], HEAD_LR_WIDTH)},
            ]
            betas = (config.momentum, config.beta2)
            return [torch.optim.AdamW(groups, betas=betas, weight_decay=config.weight_decay)]
        if trainer == "muon":
            muon = torch.optim.Muon(
                hidden,
                lr=config.lr,
                momentum=config.momentum,
                nesterov=config.nesterov,
                weight_decay=config.weight_decay,
                ns_steps=ns_steps,
            )
        else:
            muon = NormalizedNesterov(
                hidden, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
            )
        groups = [{"params": rest}, head_group]
        return [muon, torch.optim.AdamW(groups, lr=ADAMW_LR, betas=ADAMW_BETAS)]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(self.data) - SEQ_LEN, (self.batch,), generator=self.generator)
        index = starts.to(self.device)[:, None] + torch.arange(SEQ_LEN + 1, device=self.device)
        window = self.data[index].long()
        return window[:, :-1], window[:, 1:]

    def step(self, record: Sequence[str] = ()) -> tuple[float, dict[str, Tensor]]:
        """One training step; returns its loss and the optimizer's matrix for each layer in ``record``."""
        inputs, targets = self.next_batch()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.step_count += 1
        return float(loss.detach()), {name: self.recorded(name) for name in record}

    @torch.no_grad()
    def recorded(self, name: str) -> Tensor:
        """After a step: what Muon orthogonalised (Nesterov: grad.lerp(buf, μ); else buf), or AdamW's
        ``exp_avg``."""
        param = self.targets[name]
        state = self.optimizers[0].state[param]
        if self.config.kind == "adamw":
            return state["exp_avg"].cpu().clone()
        buf = state["momentum_buffer"]
        matrix = param.grad.lerp(buf, self.config.momentum) if self.config.nesterov else buf
        return matrix.cpu().clone()


@dataclass(frozen=True)
class HarvestSettings:
    """Everything besides shape, count, seed, corpus and device that changes what a harvest records."""

    steps: int
    probes: tuple[str, ...]
    trainer: str  # resolved: "muon" or "nesterov"
    ns_steps: int = DEFAULT_NS_STEPS
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP


def _settings(shape, count, steps, device, tokens_per_step, ns_steps, trainer, probes) -> HarvestSettings:
    _canonical(shape)
    _check_positive("harvest sample count", count)
    probes = parse_probes(probes)
    common = {"device": device, "tokens_per_step": tokens_per_step, "ns_steps": ns_steps, "probes": probes}
    trainer = resolve_trainer(shape, trainer, count=count, **common)
    total = resolve_steps(shape, count, steps, trainer=trainer, **common)
    return HarvestSettings(total, probes, trainer, ns_steps, tokens_per_step)


@deterministic  # bit-identical samples at any thread count or CPU load (calibrate/determinism.py)
def run_harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | Sequence[Path] | None = None,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
    probes: Sequence[str] | str | None = None,
    progress: ProgressFn | None = None,
) -> HarvestResult:
    """Train probes from scratch and record ``count`` optimizer matrices of ``shape``, in plan order.

    :func:`record_plan` says which probe, phase, step and layer each sample is. Same seed, corpus and
    settings give identical matrices on the same device. ``progress(1)`` is called after every training
    step of every run (the total is :func:`harvest_run_steps`).
    """
    settings = _settings(shape, count, steps, device, tokens_per_step, ns_steps, trainer, probes)
    plan = record_plan(shape, settings.steps, count, settings.probes)
    text, description = load_corpus(corpus)
    matrices: dict[int, Tensor] = {}
    losses: dict[str, list[float]] = {}
    for probe, length in _run_lengths(plan).items():
        run = HarvestRun(
            shape,
            text,
            seed=seed,
            probe=probe,
            device=device,
            tokens_per_step=tokens_per_step,
            ns_steps=ns_steps,
            trainer=settings.trainer,
        )
        losses[probe] = []
        for step in range(1, length + 1):
            wanted = {i: r.layer for i, r in enumerate(plan) if r.probe == probe and r.step == step}
            loss, recorded = run.step(record=sorted(set(wanted.values())))
            losses[probe].append(loss)
            matrices.update({i: recorded[layer] for i, layer in wanted.items()})
            if progress is not None:
                progress(1)
    context = {"corpus": description, "seed": seed, **_context(settings)}
    samples = [
        _sample(matrices[i], record, losses[record.probe][record.step - 1], context)
        for i, record in enumerate(plan)
    ]
    return HarvestResult(samples=samples, losses=losses)


def harvest_run_steps(
    shape: tuple[int, int], count: int, steps: int, probes: Sequence[str] | str | None = None
) -> int:
    """Training steps a harvest of a ``steps``-long nominal run takes in all (the progress total)."""
    return sum(_run_lengths(record_plan(shape, steps, count, parse_probes(probes))).values())


def _context(settings: HarvestSettings) -> dict[str, Any]:
    return {
        "ns_steps": settings.ns_steps,
        "trainer": settings.trainer,
        "tokens_per_step": settings.tokens_per_step,
        "run_steps": settings.steps,
    }


def harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | Sequence[Path] | None = None,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    ns_steps: int = DEFAULT_NS_STEPS,
    trainer: str = "auto",
    probes: Sequence[str] | str | None = None,
    progress: ProgressFn | None = None,
) -> list[Sample]:
    """The samples of :func:`run_harvest` (which also returns the loss curves)."""
    settings = {
        "tokens_per_step": tokens_per_step,
        "ns_steps": ns_steps,
        "trainer": trainer,
        "probes": probes,
        "progress": progress,
    }
    return run_harvest(shape, count, seed=seed, corpus=corpus, steps=steps, device=device, **settings).samples


def harvest_key(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus_bytes: bytes,
    device: str | torch.device,
    settings: HarvestSettings,
) -> str:
    """A name for the harvest: it covers everything a harvest depends on — shape, count, seed, corpus
    bytes, device type, run length, probes with their optimizers' settings (learning rates, momenta,
    betas), the Muon trainer, NS steps, tokens per step and the record plan (phases, steps, layers)."""
    optimizers = {name: asdict(OPTIMIZERS[parse_probe(name)[1]]) for name in settings.probes}
    plan = [asdict(r) for r in record_plan(shape, settings.steps, count, settings.probes)]
    shared = {"adamw_lr": ADAMW_LR, "adamw_betas": ADAMW_BETAS, "head_lr_width": HEAD_LR_WIDTH}
    shared |= {"phases": PHASES, "fractions": [EARLY_FRACTION, MID_FRACTION], "min_early": MIN_EARLY_STEP}
    where = [HARVEST_FORMAT, list(shape), count, seed, torch.device(device).type]
    identity = json.dumps([*where, asdict(settings), optimizers, plan, shared], sort_keys=True)
    return hashlib.sha256(identity.encode() + corpus_bytes).hexdigest()[:32]


def cached_harvest(
    shape: tuple[int, int],
    count: int,
    *,
    seed: int,
    corpus: str | Path | Sequence[Path] | None,
    steps: int,
    device: str | torch.device,
    folder: Path | None,
    probes: Sequence[str] | str | None = None,
    progress: ProgressFn | None = None,
) -> list[Sample]:
    """:func:`harvest`, read back from ``folder`` when the same harvest ran before (``None``: no cache).

    The file name is :func:`harvest_key`, so a cached file is exactly what a new harvest would record.
    """
    settings = _settings(
        shape, count, steps, device, DEFAULT_TOKENS_PER_STEP, DEFAULT_NS_STEPS, "auto", probes
    )

    def record() -> list[Sample]:
        return harvest(
            shape,
            count,
            seed=seed,
            corpus=corpus,
            steps=steps,
            device=device,
            probes=settings.probes,
            progress=progress,
        )

    if folder is None:
        return record()
    text, _ = load_corpus(corpus)
    key = harvest_key(shape, count, seed=seed, corpus_bytes=text, device=device, settings=settings)
    path = folder / f"{key}.safetensors"
    if path.exists():
        if progress is not None:
            progress(harvest_run_steps(shape, count, steps, settings.probes))
        return load_harvest(path)
    samples = record()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_harvest(samples, path, overwrite=True)
    return samples


def _sample(matrix: Tensor, record: Record, loss: float, context: dict[str, Any]) -> Sample:
    a, b = (min(matrix.shape), max(matrix.shape))
    family, optimizer = parse_probe(record.probe)
    config = OPTIMIZERS[optimizer]
    meta = {
        "shape": [a, b],
        "step": record.step,
        "phase": record.phase,
        "probe": record.probe,
        "family": family,
        "optimizer": optimizer,
        "state": "exp_avg" if config.kind == "adamw" else "momentum_buffer",
        "layer": record.layer,
        "loss": loss,
        "lr": config.lr,
        "momentum": config.momentum,
        **context,
    }
    source = f"harvest:{context['corpus']}:{record.probe}:{record.layer}:step{record.step}"
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
    # Serialised in memory (safetensors writes only to a path or to bytes), then written atomically.
    write_atomically(target, save(tensors, metadata=metadata))
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
    base = f"{meta['probe']}.{base}" if "probe" in meta else base
    key, n = base, 1
    while key in taken or key in RESERVED_KEYS:  # samples of several harvests may share layer and step
        key, n = f"{base}.{n}", n + 1
    return key


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
