"""The calibrate package's module-level imports form no cycle (a cycle makes import order matter), and its
stages import only the stages before them: sampling → fitting → analysis, with the CLI over all three."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("calibrate", "root_core")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def module_level_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports when it is imported (not imports inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in tree.body:  # top level only; a guarded `if __name__ == "__main__":` block is skipped
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, path.name == "__init__.py", node.level, node.module)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    with_parents = {".".join(m.split(".")[: i + 1]) for m in found for i in range(m.count(".") + 1)}
    return {m for m in with_parents if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    known = modules()
    graph = {}
    for name, path in known.items():
        # A package's own __init__ is imported before its modules, never because of them.
        graph[name] = {m for m in module_level_imports(name, path, known) if not name.startswith(m + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_command_is_registered_whichever_cli_module_is_imported_first():
    code = (
        "import calibrate.cli.analysis, calibrate.cli; "
        "print(*sorted(c.name for c in calibrate.cli.app.registered_commands))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["calibrate", "harvest", "list", "plot", "report", "show"]


# ---- stages: sampling → fitting → analysis, with a thin CLI over them ------------------------------------

# A stage may import the stages before it and the shared modules at calibrate/'s top level, never one after
# it; the top-level modules are shared by every stage and import none. Function-level imports count too.
STAGES = ("calibrate.sampling", "calibrate.fitting", "calibrate.analysis")
SHARED_MAY_NOT_IMPORT = (*STAGES, "calibrate.cli")


def forbidden_for(name: str) -> tuple[str, ...]:
    for i, stage in enumerate(STAGES):
        if name == stage or name.startswith(stage + "."):
            return STAGES[i + 1 :]
    if name.count(".") == 1 and name not in ("calibrate.__main__", "calibrate.cli"):
        return SHARED_MAY_NOT_IMPORT  # a shared top-level module, e.g. calibrate.errors
    return ()


def all_imports(name: str, source: str, is_package: bool) -> set[str]:
    """Every module ``name`` names in an import statement, anywhere in the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, is_package, node.level, node.module)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from .. import fitting`
    return found


def stage_violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """``module -> target`` for each import that breaks the stage order.

    ``sources``: module name -> (its code, whether it is a package's ``__init__``)."""
    return [
        f"{name} -> {target}"
        for name, (source, is_package) in sorted(sources.items())
        for target in sorted(all_imports(name, source, is_package))
        if any(target == banned or target.startswith(banned + ".") for banned in forbidden_for(name))
    ]


def test_stages_import_only_earlier_stages():
    sources = {
        name: (path.read_text(), path.name == "__init__.py")
        for name, path in modules().items()
        if name.startswith("calibrate")
    }
    assert set(STAGES) <= set(sources), "a stage package is missing"
    assert stage_violations(sources) == []


def test_the_stage_checker_finds_a_backward_import():
    sources = {
        "calibrate.sampling.harvest": ("from ..fitting.fit import fit\n", False),
        "calibrate.fitting.pipeline": ("def f():\n    from ..analysis import precision\n", False),
        "calibrate.fitting.fit": ("from calibrate.analysis.report import x\n", False),
        "calibrate.errors": ("from . import fitting\n", False),
        "calibrate.analysis.plots": ("from ..fitting.steps import k\nfrom ..sampling import Sample\n", False),
        "calibrate.cli.analysis": ("from ..analysis.precision import analyse\n", False),
    }
    assert stage_violations(sources) == [
        "calibrate.errors -> calibrate.fitting",
        "calibrate.fitting.fit -> calibrate.analysis.report",
        "calibrate.fitting.fit -> calibrate.analysis.report.x",
        "calibrate.fitting.pipeline -> calibrate.analysis",
        "calibrate.fitting.pipeline -> calibrate.analysis.precision",
        "calibrate.sampling.harvest -> calibrate.fitting.fit",
        "calibrate.sampling.harvest -> calibrate.fitting.fit.fit",
    ]
