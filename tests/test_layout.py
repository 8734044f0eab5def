"""The package's shape: imports point one way, functions and modules stay readable.

Every import counts, top-level or inside a function, since a lazy import is still a
dependency. Run `pytest tests/test_layout.py -q` after moving code between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_FUNCTION_LINES = 70
MAX_MODULE_LINES = 700


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its body."""
    found = set()
    package = name if any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b is a.b.x
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "pipeline":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(name, tree, known) for name, tree in trees.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_scanner_sees_lazy_imports_and_finds_a_planted_cycle():
    tree = ast.parse("def f():\n    from pipeline.b import x\n")
    assert imported("pipeline.a", tree, {"pipeline.a", "pipeline.b"}) == {"pipeline.b"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_lazy_imports_included():
    assert find_cycle(graph()) is None


def test_no_module_level_getattr_aliases():
    offenders = [
        name
        for name, tree in modules().items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
    ]
    assert offenders == []


def test_every_module_opens_with_a_docstring():
    assert [name for name, tree in modules().items() if not ast.get_docstring(tree)] == []


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_functions_stay_short(limit):
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_modules_stay_small():
    large = [
        f"{p.relative_to(PACKAGE.parent)} ({n} lines)"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert large == []


def test_every_import_from_the_package_names_something_that_exists():
    """Lazy imports inside functions run only when called; a module split must not leave one dangling."""
    import importlib

    dangling = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline")
            ):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    dangling.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}.{alias.name}")
    assert dangling == []
