"""The typer ``app`` of ``root-calibrate`` and what every command shares: consoles, one-line errors,
output and device checks.

``cli/__init__.py`` (calibrate, harvest; the entry point ``calibrate.cli:main``) and ``cli/analysis.py``
(plot, report, show, list) both register their commands on this ``app``. ``analysis`` imports only this
module, and ``__init__`` imports ``analysis`` last, so there is no import cycle.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from ..errors import CalibrationError
from ..fitting import ranks

EXAMPLES = """
Examples:

  root-calibrate --shapes 4096x11008 --ratio 1:3

  root-calibrate --arch llama-3.2-1b --name llama-3.2-1b --samples 24

  root-calibrate --arch qwen2.5-0.5b --steps auto --target 0.1

  root-calibrate --config path/to/config.json --real momentum/ --out my_tables/

  root-calibrate harvest --shapes 1024x4096 --count 8 --out harvest.safetensors
"""

app = typer.Typer(
    name="root-calibrate",
    help="Calibrate Newton–Schulz coefficients per matrix shape and write versioned tables for ROOT."
    + EXAMPLES,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)
err = Console(stderr=True)
out = Console()


def print_error(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(1)


def check_out_dir(directory: Path) -> None:
    """Fail now, not after an hour of work, if the table cannot be written; leave nothing behind."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CalibrationError(f"cannot write to --out '{directory}': {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise CalibrationError(f"cannot write to --out '{directory}': {error.strerror or error}") from None


def resolve_device(device: str) -> str:
    """--device as this process computes on it: under torchrun, the rank's own GPU (ranks.rank_device)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise CalibrationError(f"invalid --device '{device}': expected auto, cpu, cuda or cuda:N")
    place = ranks.launch()
    resolved = ranks.rank_device(device, place)
    if resolved.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CalibrationError(f"invalid --device '{device}': CUDA is not available on this machine")
        if place.world > 1 and place.local_rank >= torch.cuda.device_count():
            raise CalibrationError(
                f"invalid --device '{device}': LOCAL_RANK {place.local_rank} has no GPU of its own, this "
                f"machine has {torch.cuda.device_count()}; start at most that many ranks per node"
            )
    return resolved
