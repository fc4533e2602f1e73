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


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
@pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")
def test_readme_python_examples_run(code):
    exec(compile(code, str(README), "exec"), {})
