"""The notebooks run top to bottom at small sizes, and are stored without outputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("precision_vs_svd.ipynb", "new_architecture.ipynb")
# The parameter cell of each notebook reads this and switches to tiny sizes.
SMALL_ENV = "ROOT_NOTEBOOK_SMALL"
# Seconds per cell; each runs a few seconds at the small sizes on 2 CPU cores (calibration is the longest).
CELL_TIMEOUT_S = 300
# The notebooks' tempfile.mkdtemp(prefix=...) work folders.
WORKDIR_PREFIXES = {
    "precision_vs_svd.ipynb": "precision-vs-svd-",
    "new_architecture.ipynb": "new-architecture-",
}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert SMALL_ENV in code[0].source  # the first cell holds the sizes the test overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_small_sizes(name, monkeypatch, tmp_path):
    monkeypatch.setenv(SMALL_ENV, "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no spectra left in ~/.cache
    # The notebooks work in tempfile.mkdtemp() folders; the kernel and its root-calibrate subprocesses
    # take TMPDIR from here, so those folders land in tmp_path, which pytest removes, not in /tmp.
    kernel_tmp = tmp_path / "tmp"
    kernel_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob(f"{WORKDIR_PREFIXES[name]}*"))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert set(system_tmp.glob(f"{WORKDIR_PREFIXES[name]}*")) == before  # nothing left behind
    assert list(kernel_tmp.glob(f"{WORKDIR_PREFIXES[name]}*"))  # the notebook did work in kernel_tmp
