"""Architecture rules, checked on the source: the import graph of src/flowgraph.

Every ``import`` statement counts, also those inside functions; only statements under
``if TYPE_CHECKING:`` are skipped (they never run). A package's ``__init__`` counts only
when a module imports it explicitly, not because it is the module's parent.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "flowgraph"


def module_files(src: Path, package: str = PACKAGE) -> dict[str, Path]:
    """``{"flowgraph.compiler.trace": path, "flowgraph.compiler": .../__init__.py, ...}``."""
    files = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.AST):
    """Every Import/ImportFrom in ``tree``, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the `else:` branch does run
        else:
            stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is one of ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(stmt: ast.Import | ast.ImportFrom, importer: str, modules: dict[str, Path]):
    if isinstance(stmt, ast.Import):
        for alias in stmt.names:
            yield _known(alias.name, modules)
        return
    base = stmt.module or ""
    if stmt.level:
        is_package = modules[importer].name == "__init__.py"
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(stmt.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    for alias in stmt.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in modules else _known(base, modules)


def import_graph(src: Path = SRC, package: str = PACKAGE) -> nx.DiGraph:
    """Module -> module it imports, both under ``package``; edges carry the line numbers."""
    modules = module_files(src, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for stmt in _import_statements(tree):
            for target in _targets(stmt, importer, modules):
                if target is None or target == importer:
                    continue
                if graph.has_edge(importer, target):
                    graph[importer][target]["lines"].append(stmt.lineno)
                else:
                    graph.add_edge(importer, target, lines=[stmt.lineno])
    return graph


def import_cycles(graph: nx.DiGraph, limit: int = 50) -> list[list[str]]:
    """Up to ``limit`` simple cycles, each starting at its smallest module, shortest first."""
    found = []
    for cycle in nx.simple_cycles(graph):
        start = cycle.index(min(cycle))
        found.append(cycle[start:] + cycle[:start])
        if len(found) >= limit:
            break
    return sorted(found, key=lambda c: (len(c), c))


def _lines(graph: nx.DiGraph, a: str, b: str) -> str:
    return ",".join(map(str, sorted(set(graph[a][b]["lines"]))))


def _describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    hops = zip(cycle, cycle[1:] + cycle[:1], strict=True)
    return " -> ".join(f"{a} (line {_lines(graph, a, b)})" for a, b in hops) + f" -> {cycle[0]}"


# -- the rules ----------------------------------------------------------------------------
def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)
    tangles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, (
        "import cycles in src/flowgraph (module (line of the import) -> imported module):\n"
        + "\n".join("  " + _describe(graph, c) for c in cycles)
        + "\nmodules that import each other, directly or not:\n"
        + "\n".join(f"  {{{', '.join(t)}}}" for t in sorted(tangles))
    )


def test_runtime_does_not_import_the_graph_or_the_tracer():
    graph = import_graph()
    forbidden = {"flowgraph.compiler.graph", "flowgraph.compiler.trace"}
    edges = [
        f"  {a} imports {b} (line {_lines(graph, a, b)})"
        for a, b in sorted(graph.edges)
        if a.startswith("flowgraph.runtime.") and b in forbidden
    ]
    assert not edges, "the runtime imports compiler internals:\n" + "\n".join(edges)


def test_public_api_imports_in_a_fresh_interpreter():
    # Import order matters for cycles: start from the package and from the leaf modules.
    for first in ("flowgraph", "flowgraph.module", "flowgraph.compiler.trace"):
        code = (
            f"import {first}\n"
            "import flowgraph\n"
            "from flowgraph import *\n"
            "missing = [n for n in flowgraph.__all__ if not hasattr(flowgraph, n)]\n"
            "assert not missing, missing\n"
            "assert issubclass(flowgraph.TorchModule, flowgraph.BaseModule)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"import {first} first:\n{done.stderr}"


# -- the checker itself -----------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_sees_function_level_relative_and_submodule_imports(tmp_path):
    src = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\n",
            "a.py": "def f():\n    from .sub import b\nA = 1\n",
            "sub/__init__.py": "",
            "sub/b.py": "from pkg import a\n",  # pkg.a is a module: an edge to it
            "c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    import pkg.d\nelse:\n    import os\n"
                "from pkg import A\n"  # a name, not a module: an edge to pkg
            ),
            "d.py": "import pkg.c\nimport os.path\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert set(graph.edges) == {
        ("pkg", "pkg.a"),
        ("pkg.a", "pkg.sub.b"),
        ("pkg.sub.b", "pkg.a"),
        ("pkg.c", "pkg"),
        ("pkg.d", "pkg.c"),
    }
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_the_checker_catches_a_cycle_planted_in_flowgraph(tmp_path):
    import shutil

    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    planted = tmp_path / PACKAGE / "errors.py"
    planted.write_text(planted.read_text() + "\ndef _later():\n    from flowgraph import module\n")
    graph = import_graph(tmp_path)
    planted_cycles = [sorted(c) for c in nx.simple_cycles(graph, length_bound=2)]
    assert ["flowgraph.errors", "flowgraph.module"] in planted_cycles
