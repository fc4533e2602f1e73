"""Shared fixtures and the reference schedules the numeric tests use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from root_core.schedule import Schedule

# docs/design.md §2: torch.optim.Muon's default triple (KellerJordan/Muon muon.py).
MUON = Schedule(rows=((3.4445, -4.7750, 2.0315),))
# docs/design.md §2: Polar Express (Amsel et al. 2025), five per-step rows, input scaled by 1.02.
POLAR_EXPRESS = Schedule(
    rows=(
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    scale=1.02,
)
# The textbook quintic (15/8, −10/8, 3/8): slow, but it converges to 1 on all of (0, 1].
CLASSIC = Schedule(rows=((15 / 8, -10 / 8, 3 / 8),))

# A fragile per-step schedule from a table fitted on [0, 1] alone (coeff_tables/llama-3.2-1b/v1.json,
# 2048x8192): within 1.25 on [0, 1], astronomically large 1% above it.
FRAGILE = Schedule(
    rows=(
        (7.782698702088144, -21.214866685480814, 14.457407062837383),
        (4.103664610586687, -3.346893307169168, 0.6824581801754839),
        (3.695548992733615, -3.15980400681428, 0.6921100344670865),
        (2.9801292994171504, -2.4635915050947075, 0.590888608352119),
        (2.2430543484209284, -1.8817357903042349, 0.6001193678042358),
    )
)

# Wide, tall, square and batched (wide and tall) inputs: every numeric routine is checked on all of them.
SHAPES = [(16, 40), (40, 16), (24, 24), (3, 12, 20), (2, 2, 20, 12)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _private_table_home(tmp_path_factory, monkeypatch):
    """Tests never read or write the developer's own table folder (root-calibrate's default --out):
    each gets an empty one, and subprocesses inherit it through the environment."""
    from root_core.tables import USER_TABLES_ENV

    monkeypatch.setenv(USER_TABLES_ENV, str(tmp_path_factory.mktemp("table-home")))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> args…`` in ``cwd`` (so nothing lands in the repo), output captured."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
