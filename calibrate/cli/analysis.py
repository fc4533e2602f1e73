"""``root-calibrate plot | report | show | list``: precision against the SVD, registered on ``cli.app.app``.

Thin commands over ``precision`` (the numbers), ``plots`` and ``report``; every domain error is one line
and exit code 1, checked before any sample is drawn, and figures are written only once all are drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..analysis.precision import (
    DEFAULT_BASELINES,
    DEFAULT_COUNT,
    SAMPLE_SOURCES,
    Analysis,
    analyse,
    parse_baselines,
)
from ..analysis.report import (
    REPORT_FORMATS,
    format_frontier,
    format_sampled_report,
    left_aligned,
    list_tables,
    load_for_show,
    show_table,
)
from ..errors import CalibrationError
from ..progress import stages
from ..shapes import format_shape
from .app import app, check_out_dir, err, fail, out, resolve_device

PLOT_EXAMPLES = """
Examples:

  root-calibrate plot polar-express --shapes 1024x4096 --samples harvest --count 8

  root-calibrate plot coeff_tables/llama-3.2-1b/v1.json --against muon,root-paper --format svg
"""
REPORT_EXAMPLES = """
Examples:

  root-calibrate report llama-3.2-1b --format markdown

  root-calibrate report polar-express --shapes 512x2048 --against muon --format csv
"""
SHOW_EXAMPLES = "\nExamples:\n\n  root-calibrate show root-paper\n\n  root-calibrate show muon@1\n"
LIST_EXAMPLES = "\nExample:\n\n  ROOT_COEFF_TABLES=my_tables root-calibrate list\n"
FIGURE_FORMATS = ("png", "svg", "pdf")
DEFAULT_FIGURES_DIR = Path("figures")
DEFAULT_AGAINST = ",".join(DEFAULT_BASELINES)
ALL_SAMPLES = 2**31 - 1  # plot --real: a --count no file reaches, so every sample is drawn

TablesArg = Annotated[list[str], typer.Argument(help="Tables: a name (muon), name@N, or a .json path")]
Against = Annotated[
    str, typer.Option(help="Baseline tables, comma-separated, or 'none'; each on the shapes it covers")
]
Shapes = Annotated[
    str | None, typer.Option(help="Comma-separated MxN shapes (default: those the tables list)")
]
Samples = Annotated[
    str, typer.Option(help=f"{' or '.join(SAMPLE_SOURCES)}, or a momentum/harvest file or folder")
]
Count = Annotated[int, typer.Option(help="Samples per shape")]
CheckSamples = Annotated[
    int | None, typer.Option(help="Samples also run through the bf16 iteration (default: all)")
]
Seed = Annotated[int, typer.Option(help="Seed for synthetic samples and the harvester")]
HarvestSteps = Annotated[int | None, typer.Option(help="Training steps of the harvester")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars")]


def _analyse(tables, against, shapes, samples, count, check_samples, seed, harvest_steps, device, quiet):
    """Shared by plot and report, so both see the same numbers for the same arguments."""
    with stages(quiet, err) as progress:
        return analyse(
            tables,
            against=parse_baselines(against),
            shapes=shapes,
            source=samples,
            count=count,
            check_samples=check_samples,
            seed=seed,
            harvest_steps=harvest_steps,
            device=resolve_device(device),
            stage=progress.stage,
        )


def sample_descriptions(analysis: Analysis) -> dict[str, str]:
    """Shape → which samples its numbers are measured on (the figures' caption)."""
    return {format_shape(item.shape): analysis.caption(item.shape) for item in analysis.shapes}


@app.command("plot", epilog=PLOT_EXAMPLES)
def plot_command(
    tables: TablesArg,
    shapes: Shapes = None,
    against: Against = DEFAULT_AGAINST,
    samples: Samples = "synthetic",
    count: Count = DEFAULT_COUNT,
    check_samples: CheckSamples = None,
    seed: Seed = 0,
    harvest_steps: HarvestSteps = None,
    device: Device = "auto",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the figures")] = DEFAULT_FIGURES_DIR,
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FIGURE_FORMATS)}")] = "png",
    quiet: Quiet = False,
    real: Annotated[
        Path | None,
        typer.Option(
            help="ROOT's recordings (ROOT(record_dir=...)) or momentum files to draw instead of --samples: "
            "every sample in them, and the error over the recorded training steps"
        ),
    ] = None,
) -> None:
    """Per shape: error vs iterations, transfer curve P(σ), error over training (harvest samples)."""
    from ..analysis.plots import write_figures  # matplotlib loads only for this command

    try:
        if fmt not in FIGURE_FORMATS:
            raise CalibrationError(f"invalid --format '{fmt}': expected one of {', '.join(FIGURE_FORMATS)}")
        check_out_dir(out_dir)
        if real is not None:  # every recorded sample: the per-step panel needs all of a step's matrices
            samples, count = str(real), ALL_SAMPLES
        analysis = _analyse(
            tables, against, shapes, samples, count, check_samples, seed, harvest_steps, device, quiet
        )
        paths = write_figures(analysis, out_dir, fmt)
    except CalibrationError as error:
        fail(str(error))
    for path in paths:
        out.print(str(path), markup=False, highlight=False, soft_wrap=True)


@app.command("report", epilog=REPORT_EXAMPLES)
def report_command(
    tables: TablesArg,
    shapes: Shapes = None,
    against: Against = DEFAULT_AGAINST,
    samples: Samples = "synthetic",
    count: Count = DEFAULT_COUNT,
    check_samples: CheckSamples = None,
    seed: Seed = 0,
    harvest_steps: HarvestSteps = None,
    device: Device = "auto",
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(REPORT_FORMATS)}")] = "table",
    quiet: Quiet = False,
    real: Annotated[
        list[Path] | None,
        typer.Option(
            help="Score the tables on this momentum (files or folders, as calibration's --real) against "
            "Muon and Polar Express, per shape found; warns where it is deeper-tailed than the calibration"
        ),
    ] = None,
    real_is_momentum: Annotated[
        bool, typer.Option("--real-is-momentum", help="With --real: unmarked plain tensors are momentum")
    ] = False,
) -> None:
    """Mean / p95 error (float64 spectral, bf16 matrix), bound on (0, 1], steps, ratio to each baseline."""
    from ..analysis.precision import report_frame

    try:
        if fmt not in REPORT_FORMATS:
            raise CalibrationError(f"invalid --format '{fmt}': expected one of {', '.join(REPORT_FORMATS)}")
        if real:
            from ..analysis.real_report import real_report_text

            text, warnings = real_report_text(tables, real, fmt, real_is_momentum, resolve_device(device))
            print(text, flush=True)
            for warning in warnings:
                err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
            return
        analysis: Analysis = _analyse(
            tables, against, shapes, samples, count, check_samples, seed, harvest_steps, device, quiet
        )
        text = format_sampled_report(report_frame(analysis), fmt, sample_descriptions(analysis))
        if fmt in ("table", "markdown"):  # csv and json stay one table each; the plot draws this part
            text += "\n\n" + frontier_section(analysis, fmt)
    except CalibrationError as error:
        fail(str(error))
    print(text)  # plain print: rich would re-wrap a CSV or JSON document


def frontier_section(analysis: Analysis, fmt: str) -> str:
    """Error vs FLOPs per shape, the numbers of the plot's flops figure (calibrate.analysis.frontier)."""
    from ..analysis.frontier import frontier_report_frame, target_levels

    targets = {format_shape(item.shape): target_levels(analysis, item.shape) for item in analysis.shapes}
    return format_frontier(frontier_report_frame(analysis), targets, fmt)


@app.command("show", epilog=SHOW_EXAMPLES)
def show_command(
    table: Annotated[str, typer.Argument(help="A table name (muon), name@N, or a .json path")],
) -> None:
    """One table: name, version, provenance, shapes, rows and metrics."""
    try:
        text = show_table(load_for_show(table))
    except CalibrationError as error:
        fail(str(error))
    print(text)


@app.command("list", epilog=LIST_EXAMPLES)
def list_command() -> None:
    """Tables on the search path ($ROOT_COEFF_TABLES, your table folder, bundled), with their versions."""
    frame = list_tables()
    print(left_aligned(frame) if not frame.empty else "no coefficient tables found")
