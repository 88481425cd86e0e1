"""The package's shape, kept: subpackages along the data flow, imports only from a stage below
(or the same one) and never in a circle, and no module or function too long to read."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "bertpre"
# the stages from the bottom up: a module may import from its own stage and the ones below it
STAGES = [
    {"bertpre.errors", "bertpre.outputs"},
    {"bertpre.data"},
    {"bertpre.model"},
    {"bertpre.training"},
    {"bertpre.tasks"},
    {"bertpre.perf"},
    {"bertpre.help", "bertpre.lightning_cli"},
    {"bertpre.cli"},
]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> int:
    for rank, names in enumerate(STAGES):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    raise AssertionError(f"{module} belongs to no stage of tests/test_layout.py's STAGES: add it there")


def imports(path: Path) -> set[str]:
    """The bertpre modules ``path`` imports, at its top or inside a function (a lazy import is
    still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bertpre"):
            for alias in node.names:  # `from bertpre.training import throughput` imports a module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bertpre"))
    return {m for m in found if m != "bertpre"}


def test_every_module_belongs_to_a_stage_and_imports_only_downwards():
    upward = []
    for name, path in MODULES.items():
        if name == "bertpre":  # the package's own __init__ re-exports the public API
            continue
        for target in imports(path):
            assert target in MODULES, f"{name} imports {target}, which does not exist"
            if stage(target) > stage(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports from a lower stage up to a higher one: " + ", ".join(upward)


def test_no_import_cycles():
    graph = {name: imports(path) for name, path in MODULES.items() if name != "bertpre"}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt])
                                     if nxt in trail else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    path = MODULES[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path} has over {MAX_MODULE_LINES} lines: split it"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_the_stages_name_real_packages():
    for names in STAGES:
        for name in names:
            assert name in MODULES, f"STAGES names {name}, which is not a module or package of bertpre"
