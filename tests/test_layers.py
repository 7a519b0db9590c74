"""The import graph of src/merganser: no circles (function-level imports included), and
nothing below the façade imports it (``api.py``: only the CLI, the demo and the package's lazy
attributes use it). A small AST walk, run with the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "merganser"
# The façade and who may use it: the command line and the demo sit on top of it.
FACADE = "merganser.api"
ABOVE_FACADE = {"merganser.cli", "merganser.demo"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    """module -> the merganser modules it imports (at any depth of its code, TYPE_CHECKING
    blocks aside)."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and _is_type_checking(t)
                for n in ast.walk(t)}  # fmt: skip
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("merganser")}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join([*pkg[: len(pkg) - node.level + 1], node.module])
                if not base.startswith("merganser"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in files else base)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_nothing_below_the_facade_imports_it() -> None:
    users = {m for m, deps in import_graph().items() if FACADE in deps}
    assert users <= ABOVE_FACADE, sorted(users - ABOVE_FACADE)


def test_the_walk_sees_function_level_imports() -> None:
    """The check is real: cli imports the façade inside its command functions."""
    assert FACADE in import_graph()["merganser.cli"]


# The packages from the bottom up: a module may import its own package and those below it, so
# data flows one way (recipe -> plan -> engine -> method -> writer) and each package can be read
# knowing only what is under it. Equal ranks do not import each other.
LAYERS: dict[str, int] = {
    "merganser": 0,  # the package root: the version and lazy attributes only
    "errors": 0,
    "storage": 1,
    "model": 2,
    "methods": 3,
    "pipeline": 4,
    "evaluation": 5,
    "zipping": 6,
    "analysis": 6,
    "search": 7,
    "api": 8,
    "cli": 9,
    "demo": 9,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_imports_only_its_own_and_those_below() -> None:
    graph = import_graph()
    assert {_package(m) for m in graph} == set(LAYERS), "a new package needs its place in LAYERS"
    upward = sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if _package(d) != _package(m) and LAYERS[_package(d)] >= LAYERS[_package(m)]
    )
    assert not upward, upward


def test_top_level_modules_are_only_the_thin_layer() -> None:
    """Everything else lives in a package named for its concern."""
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert top == ["__init__", "api", "cli", "demo", "errors"], top
