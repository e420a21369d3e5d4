"""House rules checked on the source: ruff's lint (with Google-style docstrings) and format, no import
cycle between the project's modules (module-level or inside functions), no function longer than 100
lines in the library and the training programs, and no function-level import of a project module in
the library."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("longformer_jax", "train", "convert", "bench")
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[tuple[str, bool]]:
    """(imported project module, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # a relative import
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names] + [base]
            for t in targets:
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add((t, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def test_no_import_cycle_and_no_function_level_project_import_in_the_library():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    edges = {name: {t for t, _ in deps if not name.startswith(t + ".")} for name, deps in graph.items()}
    # A package's __init__ may import its own submodules; a submodule importing its package's
    # __init__ only for a sibling is a cycle, so both directions stay in the graph except that one.
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            dfs(name)
    lazy = sorted(
        f"{name} -> {t}"
        for name, deps in graph.items()
        if name.startswith("longformer_jax")
        for t, in_function in deps
        if in_function
    )
    assert not lazy, f"function-level imports of project modules in the library: {lazy}"


def test_no_function_longer_than_100_lines():
    long = []
    for name, path in modules().items():
        if not name.startswith(("longformer_jax", "train")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions longer than 100 lines: " + "; ".join(long)


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe is not None, "ruff is not installed: pip install -e '.[test]'"
    return [exe]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    r = subprocess.run([*ruff(), *command, *PACKAGES, "tests"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
