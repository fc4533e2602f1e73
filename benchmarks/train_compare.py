r"""Training comparison: ROOT against torch.optim.Muon and AdamW on a small byte-level LLaMA-style LM.

Five arms train the same model from the same initialisation on the same batches (per seed):
AdamW; Muon (hidden matrices, ``torch.optim.Muon``) + AdamW (embedding, head, norms); ROOT with the
``root-paper`` table; ROOT with a table calibrated for this model's own matrix shapes; and that ROOT
without the soft-threshold. Each arm's learning rate is picked from a small grid on a sweep seed that is
not among the reported seeds; the reported seeds then run at that lr. A noisy variant injects
heavy-tailed gradient noise (symmetric Pareto, tail index ``--noise-alpha``) in a fraction of the
steps, the same steps and draws for every arm, where ROOT's soft-threshold should matter.

By default the calibrated table is made at the start with ``root-calibrate`` for exactly the model's
matrix shapes (harvests are cached, so a re-run skips most of it); ``--table`` reuses one instead.

More arms, opt-in through ``--arms`` (issue 14: what precision and fewer steps buy in loss): ROOT with an
auto-step table, whose every shape runs its own step count (``--auto-table``, else made with
``root-calibrate --steps auto --target``), and ROOT with the exact polar factor U Vᵀ from an SVD in
``--svd-dtype`` in place of Newton–Schulz (soft-threshold, momentum and lr rule unchanged).

Issue 12's closed loop, opt-in too: ``ROOT recorded`` first trains one run (the sweep seed, ROOT's default
``muon`` table) recording what Newton–Schulz receives every ``--record-every`` steps, calibrates on those
recordings alone (``root-calibrate --real DIR --ratio 1:0``) and trains with that table; ``ROOT online``
starts from ``muon`` and refits its rows every ``--recalibrate-every`` steps on what it has recorded so far
(``calibrate.fitting.online.OnlineRecalibrator``). Their reported runs record too, so the report gives
each table's error on the runs' own momentum next to the loss, and the recorder's share of the training
time.

    .venv/bin/python benchmarks/train_compare.py --record         # CPU defaults, ~25 min on 2 shared cores
    .venv/bin/python benchmarks/train_compare.py --steps 100 --seeds 2 --lrs 0.004,0.008
    .venv/bin/python benchmarks/train_compare.py --device cuda --record   # GPU defaults: a larger model
    .venv/bin/python benchmarks/train_compare.py --table path/to/v1.json --no-noisy
    .venv/bin/python benchmarks/train_compare.py --no-noisy \
        --arms "Muon,ROOT calibrated,ROOT auto-steps,ROOT exact polar (SVD)" --auto-table my-auto
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from results import publish
from torch import Tensor, nn
from torch.nn import functional as F

from calibrate.errors import CalibrationError
from calibrate.sampling.corpus import load_corpus, split_corpus
from root_core import ROOT, root_param_groups
from root_core.outliers import clip_to_quantile
from root_core.recording import MomentumRecorder, RecordingError
from root_core.spectral import spectral_error
from root_core.tables import CoefficientTable, TableError, load_table

DEFAULT_ARMS = ("AdamW", "Muon", "ROOT root-paper", "ROOT calibrated", "ROOT calibrated (no threshold)")
AUTO_ARM = "ROOT auto-steps"  # the --auto-table: each shape runs its own step count (issue 14)
SVD_ARM = "ROOT exact polar (SVD)"  # U Vᵀ from an SVD in place of Newton–Schulz: precision's ceiling
RECORDED_ARM = "ROOT recorded"  # a table calibrated on the momentum a first run recorded (issue 12)
ONLINE_ARM = "ROOT online"  # recalibrated every K steps on the momentum it records itself (issue 12)
ARMS = (*DEFAULT_ARMS, AUTO_ARM, SVD_ARM, RECORDED_ARM, ONLINE_ARM)
# What the recording run and the online arm start from: ROOT's default table, as a user's first run would.
START_TABLE = "muon"
# The calibrated table's default error target for the auto-step arm: Polar Express's 5-step error on the
# same validation spectra, so the arm shows what fewer steps at Polar Express's precision cost in loss.
DEFAULT_AUTO_TARGET = "polar-express"
VOCAB = 256  # bytes
# Defaults per device. The CPU size runs the whole comparison (2 variants × 5 arms × (4 sweep runs at
# half length + 3 seeds)) in ~25 min on 2 cores shared with other jobs (1455 s measured).
PRESETS = {
    "cpu": dict(d_model=96, layers=3, heads=4, seq_len=64, batch=16, steps=200),
    "cuda": dict(d_model=512, layers=8, heads=8, seq_len=512, batch=32, steps=2000),
}
# With match_rms_adamw one grid serves all arms. On the CPU preset a first grid 0.003–0.024 put AdamW's
# best at 0.012 and Muon's/ROOT's at the 0.024 edge, with 0.003 last for every arm; hence this one.
DEFAULT_LRS = "0.006,0.012,0.024,0.048"
# Common LM settings (Moonlight, modded-nanogpt): AdamW betas for every AdamW-trained parameter, and
# decoupled weight decay for all arms alike.
ADAMW_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1  # cosine decay to 10% of the peak lr
VALIDATION_FRACTION = 0.05  # the corpus's last 5% of bytes, never trained on
SWEEP_SEED = 0  # reported seeds start at 1, so the lr is not picked on a run that is also reported
REPORT_FRACTIONS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    layers: int
    heads: int
    d_ff: int
    seq_len: int


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions (q, k, v, o: d × d matrices)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(4))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))  # SwiGLU


class ByteLM(nn.Module):
    """LLaMA-style: RMSNorm pre-norm blocks, RoPE attention, SwiGLU MLP, untied byte embedding/head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        head_dim = cfg.d_model // cfg.heads
        freqs = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.seq_len).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        return self.lm_head(self.norm(x))


def matrix_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Canonical (min, max) shapes of the parameters ROOT orthogonalises (as root_param_groups splits)."""
    hidden = root_param_groups(model)[0]["params"]
    return sorted({(min(p.shape), max(p.shape)) for p in hidden})


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    train: Tensor  # uint8 bytes
    validation: Tensor  # (sequences, seq_len + 1) int64, fixed for every run
    source: str


def load_data(args: argparse.Namespace) -> Data:
    text, source = load_corpus(args.corpus, max_bytes=args.corpus_bytes)
    train, held_out = split_corpus(text, VALIDATION_FRACTION)
    window = args.seq_len + 1
    if len(train) <= window or len(held_out) < window * args.val_sequences:
        raise CalibrationError(
            f"corpus {source!r} is too small ({len(text)} bytes) for --seq-len {args.seq_len} and "
            f"--val-sequences {args.val_sequences}"
        )
    held = torch.frombuffer(bytearray(held_out), dtype=torch.uint8)
    # Evenly spaced, non-overlapping windows over the held-out bytes: the same for every arm and seed.
    starts = torch.linspace(0, len(held) - window, args.val_sequences).long()
    validation = torch.stack([held[s : s + window] for s in starts]).long()
    return Data(torch.frombuffer(bytearray(train), dtype=torch.uint8), validation, source)


def batch_offsets(data: Data, seed: int, steps: int, batch: int, seq_len: int) -> Tensor:
    """Every step's window starts for one seed: the data order all arms share."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(data.train) - seq_len - 1, (steps, batch), generator=generator)


def get_batch(data: Data, offsets: Tensor, seq_len: int, device: torch.device) -> Tensor:
    index = offsets[:, None] + torch.arange(seq_len + 1)
    return data.train[index].long().to(device)


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, data: Data, batch: int, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for chunk in data.validation.split(batch):
        total += lm_loss(model, chunk.to(device)).item() * len(chunk)
    model.train()
    return total / len(data.validation)


# ---------------------------------------------------------------- optimizers and noise


class Optimizers:
    """One or two torch optimizers (Muon + AdamW) stepped, zeroed and scheduled together."""

    def __init__(self, *optimizers: torch.optim.Optimizer, resources: tuple = ()) -> None:
        self.optimizers = optimizers
        self.resources = resources  # closed with the run: the online arm's recalibrator (a worker process)

    def close(self) -> None:
        for resource in self.resources:
            resource.close()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("peak_lr", group["lr"])
                group["lr"] = group["peak_lr"] * factor


def make_optimizer(
    arm: str, model: nn.Module, lr: float, ctx: Context, record_dir: Path | None = None
) -> Optimizers:
    """Every arm: one lr for all parameters (Muon/ROOT matrices via Moonlight's match_rms_adamw).

    ``record_dir``: a ROOT arm records what NS receives there, every ``ctx.record_every`` steps; the online
    arm always records (into a temporary folder if none is given), since it refits on its recordings.
    """
    if arm == "AdamW":
        return Optimizers(
            torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY)
        )
    # One lr, and weight decay on every AdamW parameter (vectors too), as the AdamW arm has.
    groups = root_param_groups(model, adamw_lr=None, decay_vectors=True)
    names = {id(p): name for name, p in model.named_parameters()}
    for group in groups:  # named, so recordings say which matrix each spectrum came from
        group["param_names"] = [names[id(p)] for p in group["params"]]
    if arm == "Muon":
        muon = torch.optim.Muon(
            groups[0]["params"], lr=lr, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw"
        )
        adamw = torch.optim.AdamW(groups[1]["params"], lr=lr, betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY)
        return Optimizers(muon, adamw)
    settings = {
        "ROOT root-paper": ("root-paper", 0.9, "default"),
        "ROOT calibrated": (ctx.tables.get("calibrated"), 0.9, "error"),
        "ROOT calibrated (no threshold)": (ctx.tables.get("calibrated"), None, "error"),
        AUTO_ARM: (ctx.tables.get("auto"), 0.9, "error"),  # ns_steps=None: each entry's own step count
        SVD_ARM: ("muon", 0.9, "default"),  # the table is never used: no Newton–Schulz runs
        RECORDED_ARM: (ctx.tables.get("recorded"), 0.9, "error"),
        ONLINE_ARM: (START_TABLE, 0.9, "default"),
        RECORDING_RUN: (START_TABLE, 0.9, "default"),
    }
    chosen, quantile, missing = settings[arm]
    kind, extra = (ExactPolarROOT, {"svd_dtype": ctx.svd_dtype}) if arm == SVD_ARM else (ROOT, {})
    if arm == ONLINE_ARM:
        # Imported here, for this arm only: the fit brings in scipy and optuna (seconds of import).
        from calibrate.fitting.fit import FitSettings
        from calibrate.fitting.online import OnlineRecalibrator

        record_dir = record_dir or Path(tempfile.mkdtemp(prefix="online_", dir=ctx.scratch))
        extra = {
            "recalibrate": OnlineRecalibrator(
                out=record_dir / "tables",
                fit=FitSettings(iterations=ctx.online_iterations),
                processes=ctx.online_processes,
            ),
            "recalibrate_every": ctx.recalibrate_every,
        }
    if record_dir is not None:
        extra["recorder"] = TimedRecorder(record_dir, every=ctx.record_every)
    with warnings.catch_warnings():  # root-paper lists no shape this small: Muon's triple, said in the report
        warnings.simplefilter("ignore")
        root = kind(
            groups,
            lr=lr,
            weight_decay=WEIGHT_DECAY,
            table=chosen,
            outlier_quantile=quantile,
            adjust_lr_fn="match_rms_adamw",
            ns_dtype=ctx.ns_dtype,
            missing_shape=missing,
            adamw_betas=ADAMW_BETAS,
            **extra,
        )
    return Optimizers(root, resources=(extra["recalibrate"],) if "recalibrate" in extra else ())


class TimedRecorder(MomentumRecorder):
    """A MomentumRecorder that adds up the time it takes (the spectra and the file writes): the
    recording overhead, measured where it is spent rather than as a difference of two noisy runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def observe(self, *args, **kwargs) -> None:
        started = time.perf_counter()
        super().observe(*args, **kwargs)
        self.seconds += time.perf_counter() - started

    def end_step(self):
        started = time.perf_counter()
        path = super().end_step()
        self.seconds += time.perf_counter() - started
        return path


class ExactPolarROOT(ROOT):
    """ROOT with Newton–Schulz replaced by the exact polar factor of the clipped update (an SVD).

    Momentum, the soft-threshold, weight decay, the lr rule and the AdamW route are ROOT's own, so this
    arm differs from a ROOT arm only in how precisely the update is orthogonalised: the ceiling that any
    coefficient table approaches. A benchmark device, not part of root_core: an SVD per matrix per step
    is far slower than Newton–Schulz on an accelerator.
    """

    def __init__(self, *args, svd_dtype: torch.dtype = torch.float64, **kwargs) -> None:
        self.svd_dtype = svd_dtype
        super().__init__(*args, **kwargs)

    def _directions(self, update: Tensor, group: dict, *_recording) -> Tensor:
        # ``*_recording``: ROOT passes recorded parameter names when it records; this arm never records.
        if group["outlier_quantile"] is not None:
            update = clip_to_quantile(update, group["outlier_quantile"])
        return exact_polar(update, self.svd_dtype)


def exact_polar(update: Tensor, dtype: torch.dtype) -> Tensor:
    """U Vᵀ of each trailing matrix of ``update`` from an SVD in ``dtype``, returned in ``update``'s dtype.

    Singular directions at rounding level (σ ≤ σ_max · max(m, n) · machine eps, torch.linalg.matrix_rank's
    default tolerance, with the eps of the coarser of ``update``'s dtype and ``dtype``: a float32 update's
    null directions hold float32 rounding, whatever the SVD's precision) are numerically null: their U and
    V columns are arbitrary, so they get 0, as Newton–Schulz gives them (it maps σ ≈ 0 to ≈ 0) and as a
    zero gradient needs (no step at all).
    """
    U, sigma, Vh = torch.linalg.svd(update.to(dtype), full_matrices=False)
    eps = max(torch.finfo(dtype).eps, torch.finfo(update.dtype).eps)
    floor = sigma[..., :1] * (max(update.shape[-2:]) * eps)
    kept = (sigma > floor).to(dtype)
    return ((U * kept.unsqueeze(-2)) @ Vh).to(update.dtype)


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to FINAL_LR_FRACTION; ``step`` counts from 0."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Noise:
    prob: float  # fraction of steps that get noise
    scale: float  # noise magnitude relative to each gradient's RMS
    alpha: float  # Pareto tail index: below 2 the variance is infinite, so single entries spike


def inject_noise(model: nn.Module, noise: Noise, seed: int, step: int) -> None:
    """Add symmetric Pareto noise, scale·RMS(g)·±(U^(−1/α) − 1), to every gradient on a chosen step.

    The draws depend only on (seed, step, parameter index), so every arm sees the same steps and the
    same raw draws; only the RMS it is scaled by follows each arm's own gradients.
    """
    if torch.rand((), generator=torch.Generator().manual_seed(seed * 100_003 + step)) >= noise.prob:
        return
    for index, p in enumerate(model.parameters()):
        generator = torch.Generator(p.device).manual_seed((seed * 100_003 + step) * 1_000 + index)
        u = torch.rand(p.shape, generator=generator, device=p.device).clamp_min(1e-12)
        sign = torch.randint(0, 2, p.shape, generator=generator, device=p.device) * 2 - 1
        rms = p.grad.pow(2).mean().sqrt()
        p.grad.add_(sign * (u.pow(-1.0 / noise.alpha) - 1) * rms * noise.scale)


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    curve: dict[int, float]  # eval step → validation loss (nan once diverged)
    seconds_per_step: float
    probe: Probe | None = None  # what a recording run recorded, and an online run's recalibrations

    @property
    def final(self) -> float:
        return self.curve[max(self.curve)]


def eval_steps(steps: int, evals: int) -> list[int]:
    """Evenly spaced, always including 25%, 50% and 100% of the run; ``evals=0``: the last step only."""
    if evals == 0:
        return [steps]
    points = {max(1, round(steps * k / evals)) for k in range(1, evals + 1)}
    return sorted(points | {max(1, round(steps * f)) for f in REPORT_FRACTIONS})


@dataclass
class Probe:
    """What a ROOT run recorded, how long recording took, and the table it ended with (online: refitted)."""

    spectra: list  # RecordedSpectrum, in recording order
    record_seconds: float  # inside the recorder: spectra and file writes
    run_seconds: float  # the whole training loop, validation included
    table: object  # the CoefficientTable in use at the end
    recalibrations: list[dict]


def train(
    arm: str,
    lr: float,
    seed: int,
    noise: Noise | None,
    ctx: Context,
    steps: int,
    evals: int,
    record_dir: Path | None = None,
) -> Run:
    torch.manual_seed(seed)  # same initialisation for every arm at this seed
    model = ByteLM(ctx.model_cfg).to(ctx.device)
    optimizer = make_optimizer(arm, model, lr, ctx, record_dir)
    try:
        run = train_loop(model, optimizer, seed, noise, ctx, steps, evals)
    finally:
        optimizer.close()
    root = optimizer.optimizers[0]
    recorder = getattr(root, "recorder", None)
    if recorder is not None:
        run.probe = Probe(
            recorder.spectra(),
            recorder.seconds,
            run.seconds_per_step * steps,
            root.table,
            root.recalibrations,
        )
    return run


def train_loop(
    model: nn.Module,
    optimizer: Optimizers,
    seed: int,
    noise: Noise | None,
    ctx: Context,
    steps: int,
    evals: int,
) -> Run:
    offsets = batch_offsets(ctx.data, seed, steps, ctx.batch, ctx.model_cfg.seq_len)
    points, curve = eval_steps(steps, evals), {}
    started, diverged = time.perf_counter(), False
    for step in range(steps):
        optimizer.set_lr_factor(lr_factor(step, steps))
        loss = lm_loss(model, get_batch(ctx.data, offsets[step], ctx.model_cfg.seq_len, ctx.device))
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad()
        loss.backward()
        if noise is not None:
            inject_noise(model, noise, seed, step)
        optimizer.step()
        if step + 1 in points:
            curve[step + 1] = validation_loss(model, ctx.data, ctx.batch, ctx.device)
    seconds = (time.perf_counter() - started) / max(1, step + 1)
    curve.update({s: math.nan for s in points if diverged and s not in curve})
    return Run({s: v if math.isfinite(v) else math.nan for s, v in curve.items()}, seconds)


@dataclass
class Context:
    model_cfg: ModelConfig
    data: Data
    batch: int
    device: torch.device
    ns_dtype: torch.dtype
    tables: dict[str, object]  # "calibrated", "auto": the tables the arms that need them run on
    svd_dtype: torch.dtype = torch.float64
    shapes: tuple[tuple[int, int], ...] = ()  # the model's canonical matrix shapes
    scratch: Path | None = None  # recordings and online tables, deleted at the end
    record_every: int = 10
    recalibrate_every: int = 40
    online_iterations: int = 50
    online_processes: int = 1


def sweep(arm: str, noise: Noise | None, ctx: Context, args) -> tuple[float, dict[float, float]]:
    """Final validation loss per lr at the sweep seed; the best finite one wins."""
    losses = {}
    for lr in args.lrs:
        losses[lr] = train(arm, lr, SWEEP_SEED, noise, ctx, args.sweep_steps, evals=0).final
        log(f"  sweep {arm:<30} lr {lr:<8g} val {losses[lr]:.4f}")
    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    if not finite:
        raise CalibrationError(f"{arm} diverged at every lr in --lrs {args.lrs}")
    return min(finite, key=finite.get), losses


def compare(noise: Noise | None, ctx: Context, args) -> dict[str, dict]:
    results, loop = {}, {}
    for arm in args.arms:
        if arm == RECORDED_ARM:  # first the recording run and its calibration, for this variant's momentum
            ctx.tables["recorded"], loop = recorded_table(noise, ctx, args)
        best, losses = sweep(arm, noise, ctx, args)
        runs = [
            train(
                arm, best, seed, noise, ctx, args.steps, args.evals, record_dir=reported_record_dir(arm, ctx)
            )
            for seed in args.seed_list
        ]
        log(f"{arm:<30} lr {best:g}: final val " + ", ".join(f"{r.final:.4f}" for r in runs))
        results[arm] = {"lr": best, "sweep": losses, "runs": runs, **(loop if arm == RECORDED_ARM else {})}
    return results


def reported_record_dir(arm: str, ctx: Context) -> Path | None:
    """The closed-loop arms record their reported runs, so their tables are scored on that momentum."""
    if arm not in (RECORDED_ARM, ONLINE_ARM):
        return None
    return Path(tempfile.mkdtemp(prefix="reported_", dir=ctx.scratch))


RECORDING_RUN = "ROOT muon, recording"  # the recorded arm's first run (not an arm of its own)


def recorded_table(noise: Noise | None, ctx: Context, args) -> tuple[object, dict]:
    """Train one run recording NS inputs (sweep seed, ``START_TABLE``, ``--record-lr``), then calibrate on
    the recordings alone with root-calibrate; the table, and what the report says about the loop."""
    directory = Path(tempfile.mkdtemp(prefix="first_run_", dir=ctx.scratch))
    log(f"recording run: {START_TABLE}, lr {args.record_lr:g}, seed {SWEEP_SEED}, every {ctx.record_every}")
    first = train(RECORDING_RUN, args.record_lr, SWEEP_SEED, noise, ctx, args.steps, 0, record_dir=directory)
    extra = ("--real", str(directory), "--ratio", "1:0")
    table, how, seconds = calibrated_table(ctx.shapes, args, None, "", extra, args.recorded_samples)
    return table, {"first_run": first, "calibration": (how, seconds), "table": table}


# ---------------------------------------------------------------- the closed loop's report (issue 12)


def recorded_errors(spectra: list, table) -> dict[tuple[int, int], tuple[int, float]]:
    """Per canonical shape: how many recorded spectra, and ``table``'s mean relative NS error on them
    (each spectrum normalised by its Frobenius norm, as NS normalises its input; root_core.spectral)."""
    by_shape: dict[tuple[int, int], list[Tensor]] = {}
    for record in spectra:
        sigma = record.singular_values
        if float(sigma.norm()) > 0:
            by_shape.setdefault(canonical(record.shape), []).append(sigma / sigma.norm())
    return {
        shape: (len(rows), float(spectral_error(torch.stack(rows), table.schedule_for(shape)).mean()))
        for shape, rows in sorted(by_shape.items())
    }


def canonical(shape) -> tuple[int, int]:
    return (min(shape), max(shape))


def loop_report(variants: dict[str, dict], ctx: Context, args) -> list[str]:
    """Each table's error on the momentum the closed-loop runs recorded, next to their loss; the
    recording overhead; the online arm's refits."""
    with warnings.catch_warnings():  # muon and polar-express list no shapes: no warning is news here
        warnings.simplefilter("ignore")
        fixed = {
            f"{START_TABLE} (start)": load_table(START_TABLE),
            "polar-express": load_table("polar-express"),
        }
    fixed.update({name: ctx.tables[name] for name in ("calibrated", "auto") if name in ctx.tables})
    labels = [*fixed, "recorded", "online (end)"]
    lines = [
        f"Closed loop (issue 12): NS inputs recorded every {ctx.record_every} steps. Mean relative NS "
        "error (float64, from the recorded spectra) of each table on the momentum each run recorded; "
        "'online (end)' is each online run's own last table on its own momentum.",
        "",
        "| variant | momentum recorded in | final val loss | shape | spectra | " + " | ".join(labels) + " |",
        "|---|---|---|---|---|" + "---|" * len(labels),
    ]
    probes = []
    for variant, results in variants.items():
        loop = results.get(RECORDED_ARM, {})
        sources = []
        if "first_run" in loop:
            sources.append((f"first run (seed {SWEEP_SEED}, {START_TABLE})", [loop["first_run"]]))
        for arm in (RECORDED_ARM, ONLINE_ARM):
            if arm in results:
                sources.append((f"{arm}, seeds {args.seed_list}", results[arm]["runs"]))
        for source, runs in sources:
            probes += [run.probe for run in runs]
            lines += source_rows(variant, source, runs, fixed, loop.get("table"), labels)
    lines += ["", *overhead_lines(probes, ctx), *online_lines(variants), *calibration_lines(variants)]
    return lines


def source_rows(variant, source, runs, fixed, recorded, labels) -> list[str]:
    spectra = [record for run in runs for record in run.probe.spectra]
    errors = {label: recorded_errors(spectra, table) for label, table in fixed.items()}
    if recorded is not None:
        errors["recorded"] = recorded_errors(spectra, recorded)
    online = [recorded_errors(run.probe.spectra, run.probe.table) for run in runs if run.probe.recalibrations]
    loss = mean_std([run.final for run in runs])
    rows = []
    for shape in sorted(errors[labels[0]]):
        cells = [f"{errors[label][shape][1]:.4f}" if label in errors else "—" for label in labels[:-1]]
        cells.append(f"{statistics.mean(e[shape][1] for e in online):.4f}" if online else "—")
        count = errors[labels[0]][shape][0]
        rows.append(
            f"| {variant} | {source} | {loss} | {shape[0]}×{shape[1]} | {count} | " + " | ".join(cells) + " |"
        )
    return rows


def overhead_lines(probes: list[Probe], ctx: Context) -> list[str]:
    # Runs that only record: an online run's loop also waits for its fits, which would dilute the share.
    shares = [p.record_seconds / p.run_seconds for p in probes if p.run_seconds > 0 and not p.recalibrations]
    if not shares:
        return []
    share = statistics.median(shares)
    return [
        f"Recording overhead: the recorder (float64 spectra of every ROOT matrix, safetensors writes) took a "
        f"median {share:.2%} of the training loop's wall time over {len(shares)} runs that record and do not "
        f"refit (range "
        f"{min(shares):.2%}–{max(shares):.2%}), recording every {ctx.record_every} steps; its cost is per "
        f"recorded step, so every 100 steps would be ≈ {share * ctx.record_every / 100:.3%}.",
    ]


def online_lines(variants: dict[str, dict]) -> list[str]:
    lines = []
    for variant, results in variants.items():
        if ONLINE_ARM not in results:
            continue
        for seed, run in enumerate(results[ONLINE_ARM]["runs"], start=1):
            refits = run.probe.recalibrations
            applied = ", ".join(str(entry["applied"]) for entry in refits) or "none"
            swaps = ", ".join(str(entry["applied"]) for entry in refits if entry["swapped"]) or "none"
            table = run.probe.table
            lines.append(
                f"{ONLINE_ARM}, {variant}, seed {seed}: {len(refits)} refits applied (after steps "
                f"{applied}); rows swapped after steps {swaps}; ended on {table.name}@{table.version}."
            )
    return lines


def calibration_lines(variants: dict[str, dict]) -> list[str]:
    lines = []
    for variant, results in variants.items():
        loop = results.get(RECORDED_ARM, {})
        if "calibration" in loop:
            how, seconds = loop["calibration"]
            first = loop["first_run"]
            lines.append(
                f"{RECORDED_ARM}, {variant}: first run final val loss {first.final:.4f}, "
                f"{len(first.probe.spectra)} spectra recorded; table: {how}, {seconds:.0f} s; per shape "
                f"{table_note(loop['table'], sorted({canonical(r.shape) for r in first.probe.spectra}))}."
            )
    return lines


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- calibration


def calibrated_table(
    shapes: list[tuple[int, int]],
    args,
    given: str | None,
    flag: str,
    extra: tuple[str, ...] = (),
    samples: int | None = None,
) -> tuple[object, str, float]:
    """Load ``given`` (the value of option ``flag``), or fit one for exactly these shapes with
    root-calibrate and ``extra`` settings; check it covers them."""
    started = time.perf_counter()
    if given:
        table, how = load_table(given), f"`{flag} {given}`"
    else:
        settings = ["--shapes", ",".join(f"{m}x{n}" for m, n in shapes)]
        settings += ["--samples", str(samples or args.calib_samples)]
        settings += ["--iterations", str(args.calib_iterations), "--device", args.device, *extra]
        if args.calib_harvest_steps:
            settings += ["--harvest-steps", str(args.calib_harvest_steps)]
        if args.calib_cache:
            settings += ["--cache", str(args.calib_cache)]
        how = f"`root-calibrate {shlex.join(settings)}`"
        log(f"calibrating: {how}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # see main(): threads under load
        with tempfile.TemporaryDirectory(prefix="train_compare_") as out:
            command = [sys.executable, "-m", "calibrate", *settings, "--out", out, "--name", "train-compare"]
            done = subprocess.run([*command, "--quiet"], capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise CalibrationError(f"root-calibrate failed: {done.stderr.strip()[-300:]}")
            table = load_table(done.stdout.strip().splitlines()[-1])  # read into memory before cleanup
    missing = [s for s in shapes if s not in table.shapes]
    if missing:
        raise CalibrationError(
            f"table {table.name}@{table.version} lacks the model's shapes {missing}: the calibrated arms "
            "would silently run on its default rows"
        )
    return table, how, time.perf_counter() - started


def arm_tables(shapes: list[tuple[int, int]], args) -> tuple[dict[str, object], list[str]]:
    """The tables the chosen arms need, made or loaded once, and the report's lines on each."""
    tables, lines = {}, []
    if any(a.startswith("ROOT calibrated") for a in args.arms):
        table, how, seconds = calibrated_table(shapes, args, args.table, "--table")
        tables["calibrated"] = table
        lines.append(
            f"Calibrated table: {how}, {seconds:.0f} s; its validation error at 5 steps: "
            f"{table_note(table, shapes)}."
        )
    if "ROOT root-paper" in args.arms:
        lines.append(
            "`root-paper` lists only 2048-row shapes, so at this size it runs Muon's triple: that arm "
            "differs from Muon only by the soft-threshold."
        )
    if AUTO_ARM in args.arms:
        auto = ("--steps", "auto", "--target", args.auto_target)
        table, how, seconds = calibrated_table(shapes, args, args.auto_table, "--auto-table", auto)
        if args.frontier_steps:
            table = frontier_table(table, args.frontier_steps)
            how += f", its frontier's rows at {args.frontier_steps} steps (`--frontier-steps`)"
        tables["auto"] = table
        lines.append(f"Auto-step table: {how}, {seconds:.0f} s; per shape {auto_note(table, shapes)}.")
    if SVD_ARM in args.arms:
        lines.append(
            f"{SVD_ARM}: ROOT (soft-threshold q=0.9, same momentum and lr rule) with the clipped update's "
            f"exact polar factor U Vᵀ from torch.linalg.svd in {args.svd_dtype} in place of Newton–Schulz."
        )
    if RECORDED_ARM in args.arms:
        lines.append(
            f"{RECORDED_ARM}: a first run (seed {SWEEP_SEED}, ROOT with `{START_TABLE}`, q=0.9, lr "
            f"{args.record_lr:g}, {args.steps} steps) records NS inputs every {args.record_every} steps; "
            f"root-calibrate fits a table on {args.recorded_samples} of those recordings alone (`--real DIR "
            "--ratio 1:0`, the calibrated arm's iterations), and the arm trains with it."
        )
    if ONLINE_ARM in args.arms:
        lines.append(
            f"{ONLINE_ARM}: ROOT from `{START_TABLE}` (q=0.9) recording every {args.record_every} steps and "
            f"refitting its rows every {args.recalibrate_every} steps on what it recorded "
            f"(calibrate.fitting.online.OnlineRecalibrator, {args.online_iterations} iterations, applied "
            f"{args.recalibrate_every} steps after launch, only where better on held-out recorded spectra)."
        )
    return tables, lines


def frontier_table(table, steps: int):
    """The rows an auto-step table's search recorded for ``steps`` steps at each shape (its entries'
    ``metrics.steps_search.frontier``): what ``--steps auto`` ships where a target is first reached at that
    count, so an arm can show what fewer (or more) steps than the table chose do to the loss."""
    entries = {}
    for entry in table.entries:
        frontier = (entry.metrics or {}).get("steps_search", {}).get("frontier", [])
        point = next((p for p in frontier if p.get("steps") == steps), None)
        if point is None:
            found = sorted(p.get("steps") for p in frontier)
            raise CalibrationError(
                f"--frontier-steps {steps}: table {table.name}@{table.version} records no {steps}-step rows "
                f"for {entry.shape[0]}x{entry.shape[1]} (its frontier has steps {found or 'none'})"
            )
        metrics = {
            "validation_error": point["validation_error"],
            "baselines": entry.metrics.get("baselines", {}),
        }
        entries[entry.shape] = {"coefficients": point["coefficients"], "metrics": metrics}
    return CoefficientTable.create(
        name=f"{table.name}-k{steps}",
        default_rows=table.default,
        scale=table.normalization.scale,
        eps=table.normalization.eps,
        entries=entries,
        provenance={"source": f"{table.name}@{table.version} metrics.steps_search.frontier", "steps": steps},
    )


def ns_matmul_flops(shape: tuple[int, int], steps: int) -> int:
    """Matmul FLOPs of one standard-form quintic NS call on an m×n matrix (m ≤ n): per step
    A = X Xᵀ (2m²n), A·A (2m³) and (bA + cA²)·X (2m²n)."""
    m, n = min(shape), max(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def auto_note(table, shapes: list[tuple[int, int]]) -> str:
    """Per shape: the auto table's step count, its NS FLOPs against 5 steps, and its validation error
    next to Polar Express's (from the table's metrics, where it records them)."""
    parts = []
    for shape in shapes:
        steps = table.schedule_for(shape, missing="error").num_steps
        metrics = table.entry(shape).metrics or {}
        ours = metrics.get("validation_error")
        polar = metrics.get("baselines", {}).get("polar-express", {}).get("validation_error")
        errors = f", error {ours:.3f}" if ours is not None else ""
        errors += f" (Polar Express 5 steps {polar:.3f})" if ours is not None and polar is not None else ""
        flops = ns_matmul_flops(shape, steps) / ns_matmul_flops(shape, 5)
        parts.append(f"{shape[0]}×{shape[1]}: {steps} steps ({flops:.2f}× the FLOPs of 5){errors}")
    return "; ".join(parts)


def table_note(table, shapes: list[tuple[int, int]]) -> str:
    """The calibrated rows' own validation error next to Muon's, per shape, from the table's metrics."""
    parts = []
    for shape in shapes:
        metrics = table.entry(shape).metrics or {}
        ours = metrics.get("validation_error")
        muon = metrics.get("baselines", {}).get("muon", {}).get("validation_error")
        if ours is not None and muon is not None:
            parts.append(f"{shape[0]}×{shape[1]}: {ours:.3f} (Muon's triple {muon:.3f})")
    return "; ".join(parts) or "no metrics recorded"


# ---------------------------------------------------------------- report and plot


def mean_std(values: list[float], signed: bool = False) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    lost = f" ({len(values) - len(finite)} diverged)" if len(finite) < len(values) else ""
    return f"{statistics.mean(finite):{'+' if signed else ''}.4f} ± {spread:.4f}{lost}"


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.inf


def reference_arm(args) -> str:
    return "Muon" if "Muon" in args.arms else args.arms[0]


def paired_delta(runs: list[Run], reference: list[Run]) -> str:
    """Final-loss difference seed by seed: same init and batches, so the seeds' shared luck cancels."""
    return mean_std([r.final - ref.final for r, ref in zip(runs, reference, strict=True)], signed=True)


def results_table(variants: dict[str, dict], args) -> list[str]:
    columns = [max(1, round(args.steps * f)) for f in REPORT_FRACTIONS]
    lines = [
        "| variant | optimizer | lr | "
        + " | ".join(f"val loss @ step {c}" for c in columns)
        + f" | Δ final vs {reference_arm(args)}, paired by seed | s/step |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    for variant, results in variants.items():
        means = {
            arm: {c: finite_mean([r.curve[c] for r in res["runs"]]) for c in columns}
            for arm, res in results.items()
        }
        best = {c: min(m[c] for m in means.values()) for c in columns}
        for arm, res in results.items():
            cells = [mean_std([r.curve[c] for r in res["runs"]]) for c in columns]
            cells = [
                f"**{text}**" if means[arm][c] == best[c] else text
                for text, c in zip(cells, columns, strict=True)
            ]
            edge = " (grid edge)" if len(args.lrs) > 1 and res["lr"] in (args.lrs[0], args.lrs[-1]) else ""
            speed = statistics.median(r.seconds_per_step for r in res["runs"])
            delta = paired_delta(res["runs"], results[reference_arm(args)]["runs"])
            lines.append(
                f"| {variant} | {arm} | {res['lr']:g}{edge} | "
                + " | ".join(cells)
                + f" | {delta if arm != reference_arm(args) else '—'} | {speed:.3f} |"
            )
    return lines


def sweep_table(variants: dict[str, dict], args) -> list[str]:
    lines = [
        "| variant | optimizer | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
        "|---|---|" + "---|" * len(args.lrs),
    ]
    for variant, results in variants.items():
        for arm, res in results.items():
            cells = [
                f"{res['sweep'][lr]:.4f}" if math.isfinite(res["sweep"][lr]) else "diverged"
                for lr in args.lrs
            ]
            lines.append(f"| {variant} | {arm} | " + " | ".join(cells) + " |")
    return lines


def plot(variants: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4.5), squeeze=False)
    for ax, (variant, results) in zip(axes[0], variants.items(), strict=True):
        lows, highs = [], []
        for arm, res in results.items():
            steps = sorted(res["runs"][0].curve)
            curves = torch.tensor([[r.curve[s] for s in steps] for r in res["runs"]], dtype=torch.float64)
            mean = curves.nanmean(0)
            std = curves.std(0, correction=1 if len(curves) > 1 else 0).nan_to_num(0.0)
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{arm} (lr {res['lr']:g})")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            finite = mean[mean.isfinite()]
            if len(finite):
                lows.append(float(finite.min()))
                highs.append(float(finite[min(1, len(finite) - 1)]))
        if lows:  # zoom past the first evaluation, where all arms are far above the interesting range
            span = max(highs) - min(lows)
            ax.set_ylim(min(lows) - 0.05 * span, max(highs) + 0.05 * span)
        ax.set(
            title=f"{variant}: validation loss (mean ± std over seeds)",
            xlabel="step",
            ylabel="loss (nats/byte)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def header(args, ctx: Context, model: nn.Module, table_lines: list[str], noise: Noise) -> list[str]:
    cfg = ctx.model_cfg
    params = sum(p.numel() for p in model.parameters())
    hidden = sum(p.numel() for p in root_param_groups(model)[0]["params"])
    tokens = args.steps * args.batch * cfg.seq_len
    command = "python benchmarks/train_compare.py " + shlex.join(sys.argv[1:])
    lines = [
        f"### train_compare — {dt.date.today()} — {machine(ctx.device)} — torch {torch.__version__}",
        "",
        f"Command: `{command.strip()}`.",
        f"Model: LLaMA-style byte LM (RMSNorm, RoPE, SwiGLU, untied embedding/head), d_model {cfg.d_model}, "
        f"layers {cfg.layers}, heads {cfg.heads}, d_ff {cfg.d_ff}: {params:,} parameters, {hidden:,} in the "
        f"hidden matrices that Muon/ROOT train. Data: `{ctx.data.source}` ({args.corpus_bytes:,} bytes; last "
        f"{VALIDATION_FRACTION:.0%} held out), batch {args.batch} × {cfg.seq_len} bytes, {args.steps} steps "
        f"= {tokens:,} training tokens per run; validation on {len(ctx.data.validation)} held-out sequences.",
        f"Training: {WARMUP_FRACTION:.0%} warmup then cosine to {FINAL_LR_FRACTION:.0%}, weight decay "
        f"{WEIGHT_DECAY}, AdamW betas {ADAMW_BETAS}; Muon and ROOT scale their matrix lr by Moonlight's "
        "`match_rms_adamw` and use the same lr for their AdamW-trained embedding/head/norms; NS 5 steps (the "
        f"auto-step table: each shape's own count) in {str(ctx.ns_dtype).removeprefix('torch.')} for ROOT "
        "(Muon always bf16); soft-threshold at q=0.9.",
        f"lr: best final validation loss over {{{', '.join(f'{lr:g}' for lr in args.lrs)}}} at seed "
        f"{SWEEP_SEED} ({args.sweep_steps} steps); reported: seeds {args.seed_list}, mean ± sample std.",
        *table_lines,
    ]
    if args.noisy:
        lines.append(
            f"Noisy: in {noise.prob:.0%} of steps (the same steps and draws for every arm), every gradient "
            f"gets symmetric Pareto noise, {noise.scale:g} × its RMS × ±(U^(−1/{noise.alpha:g}) − 1): "
            "heavy-tailed, so a few entries spike by orders of magnitude."
        )
    return lines


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also picks the larger preset)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (and calibration)")
    size = parser.add_argument_group("model and data (defaults from the device's preset)")
    for name in ("d-model", "layers", "heads", "seq-len", "batch", "steps"):
        size.add_argument(f"--{name}", type=int)
    size.add_argument("--d-ff", type=int, help="SwiGLU hidden width (default 3 × d_model)")
    size.add_argument("--corpus", type=Path, help="text file or folder (default: Python stdlib sources)")
    size.add_argument("--corpus-bytes", type=int, default=8 * 2**20)
    size.add_argument("--val-sequences", type=int, default=64)
    size.add_argument("--evals", type=int, default=8, help="validation points per run")
    runs = parser.add_argument_group("runs")
    runs.add_argument("--seeds", type=int, default=3, help="reported seeds (1..N)")
    runs.add_argument("--lrs", default=DEFAULT_LRS, help="lr grid swept for every optimizer")
    runs.add_argument("--sweep-steps", type=int, help="steps of each sweep run (default: --steps / 2)")
    runs.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from: {', '.join(ARMS)}"
    )
    runs.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    noisy = parser.add_argument_group("noisy-gradient variant")
    noisy.add_argument("--no-noisy", dest="noisy", action="store_false", help="clean variant only")
    noisy.add_argument("--noise-prob", type=float, default=0.25)
    noisy.add_argument("--noise-scale", type=float, default=1.0)
    noisy.add_argument("--noise-alpha", type=float, default=1.5)
    calib = parser.add_argument_group("calibrated table")
    calib.add_argument("--table", help="bundled name or JSON path; default: calibrate one for the model")
    calib.add_argument("--calib-samples", type=int, default=8)
    calib.add_argument("--calib-iterations", type=int, default=200)
    calib.add_argument("--calib-harvest-steps", type=int)
    calib.add_argument("--calib-cache", type=Path, help="root-calibrate's cache (default: its own)")
    calib.add_argument(
        "--auto-table", help=f"{AUTO_ARM}'s table (name or path); default: root-calibrate --steps auto"
    )
    calib.add_argument(
        "--auto-target", default=DEFAULT_AUTO_TARGET, help="root-calibrate --target for the auto-step table"
    )
    calib.add_argument(
        "--frontier-steps",
        type=int,
        help=f"{AUTO_ARM}: run the auto table's frontier rows at this many steps instead of its choice",
    )
    calib.add_argument(
        "--svd-dtype", default="float64", choices=("float64", "float32"), help=f"{SVD_ARM}'s SVD"
    )
    loop = parser.add_argument_group(f"closed loop ({RECORDED_ARM}, {ONLINE_ARM})")
    loop.add_argument(
        "--record-every", type=int, help="record NS inputs every N steps (default: --steps / 20)"
    )
    loop.add_argument("--record-lr", type=float, help="the recording run's lr (default: the grid's middle)")
    loop.add_argument(
        "--recorded-samples",
        type=int,
        help=f"{RECORDED_ARM}: root-calibrate --samples (default --calib-samples)",
    )
    loop.add_argument(
        "--recalibrate-every", type=int, help=f"{ONLINE_ARM}: refit every K steps (--steps / 5)"
    )
    loop.add_argument("--online-iterations", type=int, default=50, help=f"{ONLINE_ARM}: search generations")
    loop.add_argument(
        "--online-processes",
        type=int,
        default=1,
        choices=(0, 1),
        help="1: fit in a worker process; 0: inline",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--plot", type=Path, default=Path(__file__).with_name("train_compare.png"))
    out.add_argument("--record", action="store_true", help="append the report to RESULTS.md")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the preset and reject bad input with one line, before any work."""
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available on this machine")
    for key, value in PRESETS["cpu" if args.device == "cpu" else "cuda"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.d_ff = args.d_ff or 3 * args.d_model
    args.sweep_steps = args.sweep_steps or max(1, args.steps // 2)
    args.record_every = args.record_every or max(1, args.steps // 20)
    args.recorded_samples = args.recorded_samples or args.calib_samples
    args.recalibrate_every = args.recalibrate_every or max(1, args.steps // 5)
    for key in (
        "d_model",
        "layers",
        "heads",
        "seq_len",
        "batch",
        "steps",
        "d_ff",
        "seeds",
        "evals",
        "sweep_steps",
        "val_sequences",
        "corpus_bytes",
        "calib_samples",
        "calib_iterations",
        "record_every",
        "recorded_samples",
        "recalibrate_every",
        "online_iterations",
    ):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        parser.error(f"--d-model {args.d_model} must split into --heads {args.heads} heads of even width")
    try:
        args.lrs = sorted({float(x) for x in args.lrs.split(",")})
    except ValueError:
        parser.error(f"--lrs {args.lrs!r}: expected comma-separated numbers, e.g. {DEFAULT_LRS}")
    if not all(0 < lr < 1 for lr in args.lrs):
        parser.error(f"--lrs {args.lrs}: every lr must be in (0, 1)")
    if args.frontier_steps is not None and args.frontier_steps < 1:
        parser.error(f"--frontier-steps must be at least 1, got {args.frontier_steps}")
    args.record_lr = args.record_lr or args.lrs[len(args.lrs) // 2]
    if not 0 < args.record_lr < 1:
        parser.error(f"--record-lr {args.record_lr}: must be in (0, 1)")
    args.arms = [a.strip() for a in args.arms.split(",")] if isinstance(args.arms, str) else args.arms
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if not 0 <= args.noise_prob <= 1 or args.noise_scale < 0 or args.noise_alpha <= 0:
        parser.error("--noise-prob must be in [0, 1], --noise-scale ≥ 0 and --noise-alpha > 0")
    args.seed_list = list(range(1, args.seeds + 1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    # One thread by default: on the shared 2-core machine (load ~9) two threads made a step of this
    # model 10-50× slower (OpenMP workers spinning against other jobs); one thread loses nothing here.
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(args.d_model, args.layers, args.heads, args.d_ff, args.seq_len)
    model = ByteLM(cfg)
    try:
        data = load_data(args)
        tables, table_lines = arm_tables(matrix_shapes(model), args)
        ns_dtype = getattr(torch, args.ns_dtype)
        scratch = tempfile.TemporaryDirectory(prefix="train_compare_loop_")
        ctx = Context(
            cfg,
            data,
            args.batch,
            device,
            ns_dtype,
            tables,
            getattr(torch, args.svd_dtype),
            tuple(matrix_shapes(model)),
            Path(scratch.name),
            args.record_every,
            args.recalibrate_every,
            args.online_iterations,
            args.online_processes,
        )
        noise = Noise(args.noise_prob, args.noise_scale, args.noise_alpha)
        with scratch:
            variants = {"clean": compare(None, ctx, args)}
            if args.noisy:
                variants["noisy"] = compare(noise, ctx, args)
    except (CalibrationError, TableError, RecordingError) as error:
        sys.exit(f"error: {error}")
    plot(variants, args.plot)
    lines = header(args, ctx, model, table_lines, noise)
    lines += ["", *results_table(variants, args), "", "Sweep (seed 0, final validation loss):", ""]
    lines += [*sweep_table(variants, args), ""]
    if RECORDED_ARM in args.arms or ONLINE_ARM in args.arms:
        lines += [*loop_report(variants, ctx, args), ""]
    lines.append(f"Plot: `{args.plot.name}`. Total wall time {time.perf_counter() - started:.0f} s.")
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
