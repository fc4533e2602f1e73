"""The README is the first thing a user runs: its Python examples must work as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_shows_the_two_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make setup", "make test"]


# The online recalibration example spawns its worker process and fits: ~10 s.
SLOW_BLOCKS = ("OnlineRecalibrator",)


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(code, marks=[pytest.mark.slow] if any(w in code for w in SLOW_BLOCKS) else [])
        for code in PYTHON_BLOCKS
    ],
    ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))],
)
@pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")
def test_readme_python_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files (recording momentum) leaves none in the repo
    exec(compile(code, str(README), "exec"), {})
