"""``root-calibrate``: a thin typer layer over ``calibrate.fitting.pipeline`` and the sample harvester.

Every domain error becomes one line on stderr and exit code 1; nothing is written before the inputs
have been checked, and the table is written once, atomically, at the very end.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from root_core.schedule import DEFAULT_NS_STEPS
from root_core.tables import TableError, table_spec_for, user_tables_dir

from ..errors import CalibrationError
from ..fitting import ranks
from ..fitting.fit import BACKENDS, FIT_CRITERIA, SCHEDULE_FORMS, FitSettings
from ..fitting.objective import DEFAULT_MAX_GAIN, ROUNDING_MARGIN
from ..fitting.pipeline import CalibrationRequest, ShapeResult, check_calibration_inputs, real_origins
from ..fitting.steps import DEFAULT_TARGET, Target, parse_steps, parse_target
from ..progress import stages
from ..sampling.mix import parse_ratio
from ..sampling.probes import DEFAULT_PROBES, parse_probes
from ..sampling.real import validate_real_paths
from ..sampling.recorded import recorded_shapes
from ..sampling.synthetic import FAMILIES
from ..shapes import format_shape, parse_shapes, resolve_shapes
from .app import EXAMPLES, app, check_out_dir, err, fail, out, print_error, resolve_device

PROBES_HELP = (
    "Harvester probes, FAMILY-OPTIMIZER, comma-separated; samples cycle through them. Default: "
    + ",".join(DEFAULT_PROBES)
)
SUBCOMMANDS = ("calibrate", "harvest", "plot", "report", "show", "list")


def parse_clip(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise CalibrationError(f"invalid --clip-quantile '{text}': expected a number in (0, 1] or 'none'")
    return value


def parse_step_options(steps: str, target: str | None) -> tuple[int | None, Target | None]:
    """--steps and --target: (fixed count, None) or (None, the auto run's target)."""
    fixed = parse_steps(steps)
    if fixed is not None:
        if target is not None:
            raise CalibrationError(f"--target '{target}' needs --steps auto (got --steps {steps})")
        return fixed, None
    return None, parse_target(DEFAULT_TARGET if target is None else target)


def shapes_to_calibrate(shapes, arch, config, real: list[Path]):
    """--shapes/--arch/--config; without any, the shapes ROOT recorded in --real (sampling/recorded.py)."""
    if shapes is None and arch is None and config is None and real:
        validate_real_paths(real)
        recorded = recorded_shapes(real)
        if recorded:
            return recorded, None
        raise CalibrationError(
            f"give at least one of --shapes, --arch or --config (--real {', '.join(map(str, real))} holds no "
            "ROOT recordings to take the shapes from)"
        )
    return resolve_shapes(shapes, arch, config)


def parse_families(text: str | None) -> tuple[str, ...] | None:
    """``"low_rank_noise,gaussian"`` → the family cycle; unknown names fail here, before any work."""
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in FAMILIES:
            raise CalibrationError(
                f"invalid --families '{text}': unknown family {name!r}; choose from {', '.join(FAMILIES)}"
            )
    return names


@app.command("calibrate", epilog=EXAMPLES)
def calibrate_command(
    shapes: Annotated[
        str | None, typer.Option(help="Comma-separated MxN shapes, e.g. 4096x11008,1024x4096")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="Built-in architecture preset, e.g. llama-3.2-1b")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Hugging Face-style config.json to derive shapes from")
    ] = None,
    ratio: Annotated[str, typer.Option(help="real:synthetic sample ratio")] = "1:3",
    samples: Annotated[int, typer.Option(help="Samples per shape (calibration + validation)")] = 16,
    real: Annotated[
        list[Path] | None, typer.Option(help="Real momentum: safetensors/.pt files or folders")
    ] = None,
    real_is_momentum: Annotated[
        bool,
        typer.Option(
            "--real-is-momentum",
            help="Take every tensor in --real as momentum. Without it a file must say so: an optimizer "
            'state_dict, a harvest file, safetensors metadata {"root_calibrate": "momentum"} or a '
            "*.momentum.safetensors / *.momentum.pt name",
        ),
    ] = False,
    corpus: Annotated[
        Path | None, typer.Option(help="Text for the harvester (default: Python stdlib)")
    ] = None,
    harvest_steps: Annotated[int | None, typer.Option(help="Training steps of the harvester")] = None,
    probes: Annotated[str | None, typer.Option(help=PROBES_HELP)] = None,
    clip_quantile: Annotated[
        str, typer.Option(help="Soft-threshold quantile, as in ROOT, or 'none'")
    ] = "0.9",
    families: Annotated[
        str | None,
        typer.Option(
            help="Synthetic families the samples cycle through, comma-separated; repeat a name to weigh "
            f"it more. One of {', '.join(FAMILIES)}. Default: 3/4 low_rank_noise, 1/12 each other"
        ),
    ] = None,
    steps: Annotated[
        str,
        typer.Option(
            help="Newton–Schulz steps, 1–10, or 'auto': per shape the fewest steps (2–10) whose rows reach "
            "--target"
        ),
    ] = "5",
    target: Annotated[
        str | None,
        typer.Option(
            help="With --steps auto: a relative error such as 0.1, or polar-express / muon (that set's "
            f"5-step error on the same validation spectra). Default: {DEFAULT_TARGET}"
        ),
    ] = None,
    schedule: Annotated[str, typer.Option(help=f"One of {', '.join(SCHEDULE_FORMS)}")] = "per-step",
    max_gain: Annotated[
        float, typer.Option(help="Bound on the composed polynomial over (0, 1]")
    ] = DEFAULT_MAX_GAIN,
    backend: Annotated[str, typer.Option(help=f"One of {', '.join(BACKENDS)}")] = "scipy",
    storage: Annotated[str | None, typer.Option(help="optuna storage URL, e.g. sqlite:///study.db")] = None,
    iterations: Annotated[int, typer.Option(help="Search generations (optuna: ×10 trials)")] = 200,
    fit_criterion: Annotated[
        str,
        typer.Option(
            "--fit",
            help=f"One of {', '.join(FIT_CRITERIA)}: robust = mean error, but no worse than Polar Express "
            "(shared: Muon) on deep-tail stress variants of the samples; mean = mean error alone",
        ),
    ] = "robust",
    keep_fitted: Annotated[
        bool,
        typer.Option(
            "--keep-fitted",
            help="Ship the fitted rows even at shapes where they lose to Polar Express (shared: Muon) "
            "on validation; by default such shapes get the baseline's rows",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for samples, split and search")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Tables folder; writes OUT/NAME/vN.json. Default: your table folder, which ROOT searches "
            "($ROOT_COEFF_HOME, else $XDG_DATA_HOME/root-calibrate/tables, else "
            "~/.local/share/root-calibrate/tables)",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Table name (default: --arch, else 'calibrated')")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder for harvests and spectra")] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every harvest and spectrum")
    ] = False,
    check_samples: Annotated[
        int, typer.Option(help="Validation matrices checked with the real iteration")
    ] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Fit per-shape coefficients against the SVD polar factor and write a versioned table."""
    out_dir = out_dir or user_tables_dir()

    def checked_request() -> CalibrationRequest:
        fixed_steps, step_target = parse_step_options(steps, target)
        request = CalibrationRequest(
            shapes=[],
            out=out_dir,
            name=name or arch or "calibrated",
            ratio=parse_ratio(ratio),
            samples=samples,
            seed=seed,
            real=list(real or []),
            real_is_momentum=real_is_momentum,
            corpus=corpus,
            harvest_steps=harvest_steps,
            probes=parse_probes(probes),
            clip_quantile=parse_clip(clip_quantile),
            families=parse_families(families),
            device=resolve_device(device),
            fit=FitSettings(
                steps=fixed_steps or DEFAULT_NS_STEPS,
                form=schedule,
                max_gain=max_gain,
                backend=backend,
                seed=seed,
                iterations=iterations,
                storage=storage,
                criterion=fit_criterion,
            ),
            cache_dir=None if no_cache else cache or default_cache_dir(),
            check_samples=check_samples,
            keep_fitted=keep_fitted,
            command=_command_line(),
            target=step_target,
        )
        request.shapes, request.layer_shapes = shapes_to_calibrate(shapes, arch, config, request.real)
        check_calibration_inputs(request)
        validate_real_paths(request.real)
        check_out_dir(out_dir)
        return request

    # Under torchrun every rank runs this (calibrate/fitting/ranks.py); rank 0 alone prints, and writes the
    # table.
    with ranks.joined() as team:
        code = calibrate_as(team, checked_request, quiet)
    if code:
        raise typer.Exit(code)


def calibrate_as(team: ranks.Team, checked_request, quiet: bool) -> int:
    """The checks and the run on this rank; the exit code. Printing happens before the ranks part."""
    try:
        request = team.agree(checked_request)
        with stages(quiet or not team.leader, err) as progress:
            path, results = ranks.run(request, progress, team)
    except (CalibrationError, TableError) as error:
        if team.leader:
            print_error(str(error))
        return 1
    if team.leader:
        for line in fallback_warnings(request, results):
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        if not quiet:
            out.print(summary(results, request.name))
        for result in results:  # a fallback changes what the table holds: said even with --quiet
            if result.note:
                err.print(f"note: {result.note}", markup=False, highlight=False, soft_wrap=True)
            if result.steps_note:
                err.print(f"steps: {result.steps_note}", markup=False, highlight=False, soft_wrap=True)
        # The path stays the last line, for scripts; the line before says how to use the table.
        hint = f'load it with ROOT(..., table="{table_spec_for(path)}")'
        out.print(hint, markup=False, highlight=False, soft_wrap=True)
        out.print(str(path), markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()  # before the ranks part: torchrun stops rank 0 once another rank has exited
    return 0


@app.command("harvest", epilog=EXAMPLES)
def harvest_command(
    shapes: Annotated[str, typer.Option(help="Comma-separated MxN shapes, e.g. 1024x4096")],
    out_file: Annotated[Path, typer.Option("--out", help="safetensors file to write")],
    count: Annotated[int, typer.Option(help="Matrices per shape")] = 8,
    corpus: Annotated[Path | None, typer.Option(help="Text to train on (default: Python stdlib)")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the model and the data order")] = 0,
    probes: Annotated[str | None, typer.Option(help=PROBES_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Record real momentum (Muon's and AdamW's) from small byte-level LMs at early, middle and late
    steps of training on text; save it for --real."""
    from ..sampling.harvest import harvest, harvest_run_steps, resolve_steps, save_harvest

    try:
        keys = parse_shapes(shapes)
        if count < 1:
            raise CalibrationError(f"invalid --count {count}: expected an integer ≥ 1")
        if out_file.exists() and not overwrite:
            raise CalibrationError(f"--out '{out_file}' exists; pass --overwrite to replace it")
        check_out_dir(out_file.parent)
        mix = parse_probes(probes)
        samples = []
        with stages(quiet, err) as progress:
            for key in keys:
                run = resolve_steps(key, count, steps, device=resolve_device(device), probes=mix)
                total = harvest_run_steps(key, count, run, mix)
                with progress.stage(f"{format_shape(key)} harvest ({total} steps)", total) as advance:
                    samples += harvest(
                        key,
                        count,
                        seed=seed,
                        corpus=corpus,
                        steps=run,
                        device=resolve_device(device),
                        probes=mix,
                        progress=advance,
                    )
        path = save_harvest(samples, out_file, overwrite=overwrite)
    except CalibrationError as error:
        fail(str(error))
    out.print(str(path), markup=False, highlight=False, soft_wrap=True)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/root-calibrate (~/.cache/...): shared by every run on the machine."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "root-calibrate"


def fallback_warnings(request: CalibrationRequest, results: list[ShapeResult]) -> list[str]:
    """One line per shape whose real samples were (partly) harvested although --real was given."""
    if not request.real:
        return []
    lines = []
    for result in results:
        if result.counts["matrix_checked"] == 0:
            lines.append(
                f"note: {format_shape(result.key)}: its checked validation samples are recorded spectra, "
                "so the float32/bf16 matrix check did not run (spectral errors did); record whole updates "
                "with ROOT(record_matrices=...) to check them"
            )
        origins = real_origins(result)
        if origins["harvest"]:
            found = f"only {origins['files']}" if origins["files"] else "no"
            lines.append(
                f"warning: --real held {found} {format_shape(result.key)} tensor(s); "
                f"{origins['harvest']} of its real samples were harvested instead (see provenance "
                "real_per_shape)"
            )
    return lines


def summary(results: list[ShapeResult], name: str = "calibrated") -> Table:
    """Validation errors of the table's rows (labelled with its name) next to the baselines, per shape."""
    table = Table(
        title="Relative error vs the SVD polar factor, validation mean",
        caption=summary_caption(results),
        caption_justify="left",
    )
    for column in ("shape", "table", "spectral", "float32", "bf16", f"max P (+{ROUNDING_MARGIN:.0%})"):
        table.add_column(column, justify="left" if column == "table" else "right", no_wrap=True)
    for result in results:
        for label, errors in result.validation.items():
            matrix = result.matrix.get(label, {})
            table.add_row(
                format_shape(result.key),
                name if label == "calibrated" else label,
                f"{sum(errors) / len(errors):.4f}",
                _fmt(matrix.get("float32")),
                _fmt(matrix.get("bfloat16")),
                "" if (bound := result.bound_for(label)) is None else f"{bound:.4f}",
            )
    return table


def summary_caption(results: list[ShapeResult]) -> str:
    """Which samples each column averages: spectral all validation samples, float32/bf16 a subset."""
    validation = _count_range(r.counts["validation"] for r in results)
    checked = _count_range(r.counts["matrix_checked"] for r in results)
    return (
        f"spectral: float64 from the spectrum, over all {validation} validation samples per shape; "
        f"float32 / bf16: the real iteration, over the first {checked} of them (--check-samples)"
    )


def _count_range(counts) -> str:
    values = sorted(set(counts))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _fmt(values: list[float] | None) -> str:
    return f"{sum(values) / len(values):.4f}" if values else "—"


def _command_line() -> str:
    return " ".join(shlex.quote(arg) for arg in ["root-calibrate", *sys.argv[1:]])


def with_default_command(args: list[str]) -> list[str]:
    """``root-calibrate --shapes …`` means ``root-calibrate calibrate --shapes …``."""
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h"):
        return ["calibrate", *args]
    return args


def main() -> None:
    app(args=with_default_command(sys.argv[1:]), prog_name="root-calibrate")


# Registers plot, report, show and list on app after calibrate and harvest, so --help lists them in that
# order; analysis.py imports app.py, never this module, so this is no import cycle.
from . import analysis  # noqa: E402,F401

if __name__ == "__main__":
    main()
