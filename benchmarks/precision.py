"""Precision on held-out real momentum and on synthetic families: calibrated tables against published sets.

Held-out means calibration never saw it: momentum harvested with another seed from another corpus
(default: the installed torch package's Python sources, where calibration trains on the standard
library), and synthetic matrices drawn with a seed no calibration uses (SYNTHETIC_SEED). Next to that
"held-out real" set, the *independent* set differs from calibration in probe family, optimizer and
corpus, and spans training: a post-LN grouped-query probe trained with Muon without Nesterov
(momentum 0.9) and with AdamW at torch's defaults (``exp_avg``), recorded early, mid-way and late
(``calibrate/sampling/probes.py``: HELD_OUT_PROBES). It is reported per shape, per phase and per
optimizer, because another seed of the calibration harvester hides exactly where a table fails.
``--independent-set 2`` swaps in a second independent set that no table or rule was tuned on: a parallel
(GPT-J/PaLM-style) multi-query probe with squared-ReLU MLP, trained with Muon at momentum 0.85 and with
AdamW at β1 0.8 (SECOND_HELD_OUT_PROBES), seed 2, on the prose of the installed packages' METADATA and
LICENSE files; the "held-out real" rows stay as they are. Every matrix is clipped as the optimizer
clips it (q=0.9 unless the table says otherwise), then scored at each set's own step count (5;
you-6step: 6): the float64 spectral error for every matrix, and the measured bf16 matrix error of
``orthogonalize`` against the SVD polar factor for the first ``--matrix-count`` real matrices (and
``--synthetic-matrix-count`` per synthetic family).

Two outputs. The default lists, per shape, every calibrated table and baseline on held-out real
momentum. ``--leaderboard`` adds one row per synthetic family and lays the sets out side by side:
Muon, Polar Express, ROOT paper, You 6-step, classic, ours shared and ours per-step (the first
``--table`` of that form that lists the shape; "—" where none does, never a silent default).

    python benchmarks/precision.py --table llama-3.2-1b --table llama-3.2-1b-shared --record
    python benchmarks/precision.py --leaderboard --table llama-2-7b --table llama-2-7b-shared \\
        --shapes 64x256,128x512,256x1024,4096x4096 --record
    python benchmarks/precision.py --table tiny --shapes 64x256 --count 4 --steps 40
    python benchmarks/precision.py --table qwen2.5-0.5b --independent-set 2 --matrix-count 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from results import publish

from calibrate.cli import default_cache_dir
from calibrate.errors import CalibrationError
from calibrate.evaluate import matrix_errors
from calibrate.fitting.objective import ROUNDING_MARGIN, safety, sample_errors, stack_spectra
from calibrate.sampling import Sample
from calibrate.sampling.corpus import dist_info_corpus_files
from calibrate.sampling.harvest import cached_harvest, resolve_steps
from calibrate.sampling.probes import HELD_OUT_PROBES, OPTIMIZERS, SECOND_HELD_OUT_PROBES
from calibrate.sampling.synthetic import FAMILIES, synthetic_sample
from calibrate.shapes import format_shape, parse_shapes
from calibrate.spectra import normalized_spectrum
from root_core import load_table
from root_core.schedule import Schedule
from root_core.tables import PUBLISHED_TABLES, CoefficientTable

# The published sets; root-paper only where it published the shape.
BASELINES = PUBLISHED_TABLES
OURS_SHARED, OURS_PER_STEP = "ours shared", "ours per-step"
COLUMNS = (*BASELINES, OURS_SHARED, OURS_PER_STEP)
HELD_OUT_SEED = 1  # calibration harvests with seed 0
SECOND_SET_SEED = 2  # the second independent set: neither calibration's seed nor the first set's
# Samples cycle the 2 held-out probes × 3 phases (harvest.record_plan): 6 holds every pair once.
INDEPENDENT_COUNT = 6
# Calibration draws its synthetic samples with its own --seed (0 by default, small in practice); a
# seed far from those gives matrices no calibration run has seen.
SYNTHETIC_SEED = 10_000
# The leaderboard's default small shapes (next to every shape the tables list): cheap, and not in any
# bundled calibrated table, so they show how the published sets do where ours has no entry.
SMALL_SHAPES = "64x256,128x512,256x1024"
MISSING = "—"


def held_out_corpus() -> Path:
    """Python source text that is on every machine with this toolkit, and not the standard library."""
    return Path(torch.__file__).parent


@dataclass(frozen=True)
class IndependentSet:
    """What an independent held-out set is harvested from, and where its harvests are cached."""

    probes: tuple[str, ...]
    seed: int
    folder: str  # under --cache; set 1 shares the held-out harvest's folder, as before set 2 existed
    corpus_label: str  # how reports name the corpus
    own_corpus: Callable[[], list[Path]] | None = None  # None: ``--corpus``, as the held-out harvest

    def corpus(self, args) -> Path | list[Path]:
        return self.own_corpus() if self.own_corpus is not None else args.corpus


INDEPENDENT_SETS = {
    1: IndependentSet(HELD_OUT_PROBES, HELD_OUT_SEED, "held-out-harvest", "the --corpus sources"),
    2: IndependentSet(
        SECOND_HELD_OUT_PROBES,
        SECOND_SET_SEED,
        "held-out-harvest-2",
        "the installed packages' dist-info METADATA and LICENSE files",
        dist_info_corpus_files,
    ),
}


# ---- coefficient sets ------------------------------------------------------------------------------


def baseline_schedules(key) -> dict[str, Schedule]:
    """Every published set that applies at the shape (root-paper only where it published it)."""
    schedules = {}
    for name in BASELINES:
        baseline = load_table(name)
        if not baseline.entries or key in baseline.shapes:
            schedules[name] = baseline.schedule_for(key)
    return schedules


def schedules_for(key, tables) -> dict[str, Schedule]:
    """Each calibrated table's rows for the shape (tables that list it), then the baselines."""
    schedules = {}
    for table in tables:
        if key in table.shapes:
            schedules[label(table)] = table.schedule_for(key)
    return {**schedules, **baseline_schedules(key)}


def leaderboard_schedules(key, tables) -> tuple[dict[str, Schedule], dict[str, str]]:
    """Column → schedule at the shape, and which table fills each "ours" column.

    A calibrated entry with one row is the paper's shared-triple form, more rows are per-step.
    """
    schedules = baseline_schedules(key)
    sources: dict[str, str] = {}
    for table in tables:
        if key not in table.shapes:
            continue
        schedule = table.schedule_for(key)
        column = OURS_PER_STEP if len(schedule.rows) > 1 else OURS_SHARED
        if column not in schedules:
            schedules[column] = schedule
            sources[column] = label(table)
    return schedules, sources


def label(table: CoefficientTable) -> str:
    return f"{table.name}@{table.version}"


def check_held_out(tables, corpus: Path, independent: IndependentSet = INDEPENDENT_SETS[1]) -> None:
    """Refuse to score a table on the very momentum or synthetic stream it was calibrated on."""
    for table in tables:
        held_out = {*HELD_OUT_PROBES, *independent.probes}
        trained = set(table.provenance.get("harvest_probes", [])) & held_out
        if trained:
            raise SystemExit(
                f"table {label(table)} was calibrated on {', '.join(sorted(trained))}: not held out"
            )
        seed = table.provenance.get("seed")
        if seed == HELD_OUT_SEED and table.provenance.get("corpus") == str(corpus):
            raise SystemExit(f"table {label(table)} was calibrated on seed {seed} of {corpus}: not held out")
        if seed == SYNTHETIC_SEED:
            raise SystemExit(f"table {label(table)} was calibrated with synthetic seed {seed}: not held out")


# ---- samples ---------------------------------------------------------------------------------------


def held_out_samples(key, args) -> list[Sample]:
    """The held-out harvest, read back from ``--cache`` when the same harvest ran before; its folder is
    apart from calibration's cache."""
    return cached_harvest(
        key,
        args.count,
        seed=HELD_OUT_SEED,
        corpus=args.corpus,
        steps=resolve_steps(key, args.count, args.steps),
        device="cpu",
        folder=args.cache / "held-out-harvest" if args.cache is not None else None,
    )


def independent_samples(key, args, which: int | None = None) -> list[Sample]:
    """Momentum from the held-out probes of independent set ``which`` (default ``args.independent_set``,
    else 1: another family, optimizers, seed and corpus than calibration), early to late."""
    chosen = INDEPENDENT_SETS[which or getattr(args, "independent_set", 1)]
    count = args.independent_count
    return cached_harvest(
        key,
        count,
        seed=chosen.seed,
        corpus=chosen.corpus(args),
        steps=resolve_steps(key, count, args.steps, probes=chosen.probes),
        device="cpu",
        folder=args.cache / chosen.folder if args.cache is not None else None,
        probes=chosen.probes,
    )


second_independent_samples = partial(independent_samples, which=2)


def independent_groups(samples: list[Sample]) -> dict[str, list[int]]:
    """Sample indices of the whole set, of each training phase and of each optimizer kind (non-empty)."""
    groups = {"independent": list(range(len(samples)))}
    for phase in ("early", "mid", "late"):
        groups[f"independent {phase}"] = [i for i, s in enumerate(samples) if s.meta.get("phase") == phase]
    for kind in ("muon", "adamw"):
        groups[f"independent {kind}"] = [
            i for i, s in enumerate(samples) if OPTIMIZERS[s.meta["optimizer"]].kind == kind
        ]
    return {name: members for name, members in groups.items() if members}


def group_scores(samples: list[Sample], schedules, clip) -> dict[str, tuple[int, dict[str, float]]]:
    """Each independent group's size and mean float64 spectral error per coefficient set."""
    spectra = stack_spectra([normalized_spectrum(s.matrix, clip_quantile=clip) for s in samples])
    errors = {name: sample_errors(spectra, schedule).tolist() for name, schedule in schedules.items()}
    return {
        group: (len(members), {name: statistics.mean(e[i] for i in members) for name, e in errors.items()})
        for group, members in independent_groups(samples).items()
    }


def synthetic_sets(key, count: int) -> dict[str, list[Sample]]:
    """``count`` matrices of every synthetic family, from the held-out synthetic seed."""
    return {
        family: [synthetic_sample(key, i, seed=SYNTHETIC_SEED, family=family) for i in range(count)]
        for family in FAMILIES
    }


# ---- scoring ---------------------------------------------------------------------------------------


@dataclass
class Scores:
    """One sample set's errors per coefficient set (label → mean); bf16 is NaN where nothing was checked."""

    spectral: dict[str, float]
    worst: dict[str, float]
    bf16: dict[str, float]
    count: int
    checked: int


def score(samples: list[Sample], schedules: dict[str, Schedule], clip, checked: int) -> Scores:
    spectra = stack_spectra([normalized_spectrum(s.matrix, clip_quantile=clip) for s in samples])
    checked = min(checked, len(samples))
    matrix = matrix_errors(
        [s.matrix for s in samples[:checked]],
        schedules,
        clip_quantile=clip,
        dtypes={name: ("bfloat16",) for name in schedules},
    )
    spectral, worst, bf16 = {}, {}, {}
    for name, schedule in schedules.items():
        errors = sample_errors(spectra, schedule).tolist()
        spectral[name], worst[name] = statistics.mean(errors), max(errors)
        measured = matrix[name].get("bfloat16", [])
        bf16[name] = statistics.mean(measured) if measured else math.nan
    return Scores(spectral, worst, bf16, len(samples), checked)


# ---- reports ---------------------------------------------------------------------------------------


def header(args) -> list[str]:
    machine = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    kind = "precision leaderboard" if args.leaderboard else "precision"
    synthetic = (
        f"; synthetic: {args.synthetic_count} per family, seed {SYNTHETIC_SEED} (calibration: its --seed, "
        f"0 by default), bf16-checked {args.synthetic_matrix_count} per family"
        if args.leaderboard
        else ""
    )
    independent = INDEPENDENT_SETS[args.independent_set]
    where = (
        "same seed and corpus"
        if args.independent_set == 1
        else f"seed {independent.seed}, corpus: {independent.corpus_label}"
    )
    return [
        f"### {kind} — {dt.date.today()} — {machine} — torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/precision.py {shlex.join(sys.argv[1:])}`. Held-out momentum: "
        f"harvest seed {HELD_OUT_SEED}, corpus `{args.corpus.name}` sources (calibration: seed 0, stdlib)"
        f"{synthetic}. Independent held-out momentum (set {args.independent_set}): "
        f"{args.independent_count} per shape from probes {', '.join(independent.probes)} (a family and "
        f"optimizers calibration never trains), {where}, early/mid/late snapshots. Clipped as ROOT clips; "
        "each set at its own step count (5; you-6step: 6); errors relative to the exact polar factor.",
        "",
    ]


def long_rows(key, scores: Scores, schedules) -> list[str]:
    return [
        f"| {format_shape(key)} | {name} | {scores.spectral[name]:.4f} | {scores.worst[name]:.4f} | "
        f"{_or_missing(scores.bf16[name])} | {exact_bound(schedule):.4f} | "
        f"{bound_text(rounded_bound(schedule))} |"
        for name, schedule in schedules.items()
    ]


def _or_missing(value: float) -> str:
    """A score, or "—" where it was not measured (e.g. ``--matrix-count 0`` skips the bf16 check)."""
    return MISSING if math.isnan(value) else f"{value:.4f}"


def run_long(keys, tables, args) -> str:
    lines = [
        *header(args),
        "| shape | coefficients | mean spectral error (f64) | worst | bf16 matrix error | max P on [0,1] "
        f"| max P, {ROUNDING_MARGIN:.0%} rounding margin |",
        "|---|---|---|---|---|---|---|",
    ]
    clip = clip_quantile(tables)
    columns = [*(label(t) for t in tables), *BASELINES]
    independent = [
        "",
        f"Independent held-out momentum (set {args.independent_set}), mean float64 spectral error per "
        "phase and optimizer "
        f"(bold: best in the row; {MISSING}: no entry for the shape):",
        "",
        f"| shape | samples | {' | '.join(columns)} |",
        "|---|---|" + "---|" * len(columns),
    ]
    for key in keys:
        started = time.perf_counter()
        samples = held_out_samples(key, args)
        schedules = schedules_for(key, tables)
        lines += long_rows(key, score(samples, schedules, clip, args.matrix_count), schedules)
        independent += independent_rows(key, independent_samples(key, args), schedules, columns, clip)
        progress(
            f"{format_shape(key)}: {len(samples)} held-out and {args.independent_count} independent "
            f"matrices in {time.perf_counter() - started:.0f} s"
        )
    return "\n".join(lines + independent) + "\n"


def independent_rows(key, samples, schedules, columns, clip) -> list[str]:
    return [
        table_row(key, f"{group} ({size})", cells(values, columns))
        for group, (size, values) in group_scores(samples, schedules, clip).items()
    ]


def cells(values: dict[str, float], columns=COLUMNS) -> list[str]:
    """One cell per column, the row's lowest error in bold, "—" for sets without an entry here."""
    present = [v for v in values.values() if not math.isnan(v)]
    best = min(present) if present else math.nan
    out = []
    for column in columns:
        value = values.get(column, math.nan)
        text = _or_missing(value)
        out.append(f"**{text}**" if value == best else text)
    return out


def table_row(key, what: str, values: list[str]) -> str:
    return f"| {format_shape(key)} | {what} | {' | '.join(values)} |"


def leaderboard_shape(key, tables, args) -> tuple[list[str], list[str], str]:
    """The shape's f64 rows, bf16 rows and a note naming the tables behind the "ours" columns."""
    clip = clip_quantile(tables)
    schedules, sources = leaderboard_schedules(key, tables)
    sets = {"held-out real": (held_out_samples(key, args), args.matrix_count)}
    sets |= {
        f"synthetic {f}": (s, args.synthetic_matrix_count)
        for f, s in synthetic_sets(key, args.synthetic_count).items()
    }
    spectral_rows, bf16_rows = [], []
    for what, (samples, checked) in sets.items():
        scores = score(samples, schedules, clip, checked)
        spectral_rows.append(table_row(key, f"{what} ({scores.count})", cells(scores.spectral)))
        if scores.checked:
            bf16_rows.append(table_row(key, f"{what} ({scores.checked})", cells(scores.bf16)))
        if what == "held-out real":
            spectral_rows += independent_rows(key, independent_samples(key, args), schedules, COLUMNS, clip)
    for what, bound in (
        ("max P on [0,1]", exact_bound),
        (f"max P, {ROUNDING_MARGIN:.0%} rounding margin", rounded_bound),
    ):
        bounds = {name: bound(schedule) for name, schedule in schedules.items()}
        texts = [bound_text(bounds[c]) if c in bounds else MISSING for c in COLUMNS]
        spectral_rows.append(table_row(key, what, texts))
    note = ", ".join(f"{column} = {source}" for column, source in sources.items()) or "no calibrated entry"
    return spectral_rows, bf16_rows, f"{format_shape(key)}: {note}"


def run_leaderboard(keys, tables, args) -> str:
    columns = " | ".join(COLUMNS)
    rule = "|---|---|" + "---|" * len(COLUMNS)
    spectral = [
        "Mean float64 spectral error (bold: best in the row):",
        "",
        f"| shape | samples | {columns} |",
        rule,
    ]
    bf16 = [
        "Mean measured bf16 matrix error (`orthogonalize` vs SVD polar factor):",
        "",
        f"| shape | samples | {columns} |",
        rule,
    ]
    notes = []
    for key in keys:
        started = time.perf_counter()
        spectral_rows, bf16_rows, note = leaderboard_shape(key, tables, args)
        spectral += spectral_rows
        bf16 += bf16_rows
        notes.append(note)
        progress(f"{format_shape(key)}: scored in {time.perf_counter() - started:.0f} s")
    legend = [
        "",
        f"Ours per shape ({MISSING}: no table given lists the shape; root-paper {MISSING}: not one of its "
        "four published shapes, where it runs Muon's triple): " + "; ".join(notes) + ".",
        "",
    ]
    if len(bf16) == 4:  # header lines only: --matrix-count and --synthetic-matrix-count were 0
        bf16 = ["bf16 matrix check: not run (--matrix-count 0, --synthetic-matrix-count 0)."]
    return "\n".join(header(args) + spectral + [""] + bf16 + legend)


def exact_bound(schedule: Schedule) -> float:
    """max of the composed polynomial on [0, 1], exactly (docs/design.md §1)."""
    return safety(schedule, margin=0.0).high


def rounded_bound(schedule: Schedule) -> float:
    """The same, when σ and every step's output may come out up to ROUNDING_MARGIN too large (bf16)."""
    return safety(schedule).high


def bound_text(value: float) -> str:
    return f"{value:.4f}" if value < 1e4 else f"{value:.1e}"


def clip_quantile(tables) -> float | None:
    return tables[0].provenance.get("clip_quantile", 0.9)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- command line ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", action="append", required=True, help="calibrated table(s) to score")
    parser.add_argument(
        "--shapes",
        help="default: every shape of the first table (--leaderboard: of every table, plus "
        + SMALL_SHAPES
        + ")",
    )
    parser.add_argument("--count", type=int, default=4, help="held-out matrices per shape")
    parser.add_argument(
        "--independent-count",
        type=int,
        default=INDEPENDENT_COUNT,
        help="independent held-out matrices per shape (6: every probe × phase pair once)",
    )
    parser.add_argument("--matrix-count", type=int, default=1, help="of which checked with bf16 matrices")
    parser.add_argument("--steps", type=int, default=None, help="harvest training steps")
    parser.add_argument(
        "--independent-set",
        type=int,
        choices=tuple(INDEPENDENT_SETS),
        default=1,
        help="which independent held-out set (2: the second, that no table or rule was tuned on)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=held_out_corpus(),
        help="held-out and independent set 1 corpus (set 2 always reads its own)",
    )
    parser.add_argument("--leaderboard", action="store_true", help="sets side by side, plus synthetic rows")
    parser.add_argument("--synthetic-count", type=int, default=1, help="matrices per synthetic family")
    parser.add_argument(
        "--synthetic-matrix-count", type=int, default=1, help="of which checked with bf16 matrices"
    )
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="held-out harvest cache")
    parser.add_argument("--no-cache", action="store_true", help="harvest again, write nothing")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    for name in ("count", "synthetic_count", "independent_count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("matrix_count", "synthetic_matrix_count"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.no_cache:
        args.cache = None
    return args


def shapes_to_score(args, tables) -> list[tuple[int, int]]:
    if args.shapes:
        return parse_shapes(args.shapes)
    if not args.leaderboard:
        return tables[0].shapes
    keys = [key for table in tables for key in table.shapes] + parse_shapes(SMALL_SHAPES)
    return sorted(set(keys), key=lambda key: (key[0] * key[1], key))


def main() -> None:
    args = parse_args()
    try:
        tables = [load_table(spec) for spec in args.table]
        keys = shapes_to_score(args, tables)
    except (CalibrationError, ValueError, LookupError) as error:
        raise SystemExit(f"precision.py: {error}") from None
    check_held_out(tables, args.corpus, INDEPENDENT_SETS[args.independent_set])
    report = run_leaderboard(keys, tables, args) if args.leaderboard else run_long(keys, tables, args)
    publish(report, args.record)


if __name__ == "__main__":
    main()
