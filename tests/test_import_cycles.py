"""No import cycles in pgolf/: the import graph, read with `ast`, must be acyclic.

Every import counts, wherever it is written, and each edge says which kind it is:
- `module`: at module level (a class body included), run when the module is imported;
- `function`: inside a function, run when that function is first called (a lazy import);
- `type`: under `if TYPE_CHECKING:`, never run, read by type checkers only.
A lazy or type-only import does not crash at import time, but it still ties the two modules to each
other, so a cycle through one is a cycle: the test fails on it and names its edges and their kinds.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

MODULE, FUNCTION, TYPE = "module", "function", "type"
Graph = dict[str, dict[str, set[str]]]  # importer -> imported -> kinds


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `package` (a package is its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules) -> list[str]:
    """The modules of `modules` that an import statement loads (a `from m import x` loads m.x when
    that is a module, else m itself)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, one level up per extra dot
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
        ]
    return [n for n in names if n in modules and n != importer]


def import_graph(package: Path) -> Graph:
    modules = module_names(package)
    graph: Graph = {name: {} for name in modules}

    def visit(node: ast.AST, kind: str, importer: str, is_package: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _imported(child, importer, is_package, modules):
                    graph[importer].setdefault(target, set()).add(kind)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), TYPE, importer, is_package)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind, importer, is_package)
                continue
            inner = (
                FUNCTION if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else kind
            )
            visit(child, inner if kind != TYPE else TYPE, importer, is_package)

    for name, path in modules.items():
        visit(ast.parse(path.read_text(encoding="utf-8")), MODULE, name, path.name == "__init__.py")
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def shortest_loop(graph: Graph, start: str, component: list[str]) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise ValueError(f"{start} is on no loop in {component}")


def describe(graph: Graph, component: list[str]) -> str:
    """One loop of the cycle, `a [kind] -> b` read as "a imports b (kind)", then all its edges."""
    loop = shortest_loop(graph, component[0], component)
    steps = " -> ".join(f"{a} [{', '.join(sorted(graph[a][b]))}]" for a, b in zip(loop, loop[1:]))
    edges = [
        f"  {a} -> {b} [{', '.join(sorted(kinds))}]"
        for a in component
        for b, kinds in sorted(graph[a].items())
        if b in component
    ]
    return f"cycle: {steps} -> {loop[-1]}\n all edges among {', '.join(component)}:\n" + "\n".join(edges)


def test_pgolf_has_no_import_cycles():
    graph = import_graph(REPO / "pgolf")
    assert len(graph) > 50 and graph["pgolf.trainer"], "the graph reader found too little"
    found = [describe(graph, c) for c in cycles(graph)]
    assert not found, "import cycles (break each; lazy and TYPE_CHECKING imports count too):\n" + "\n".join(
        found
    )


def test_models_never_import_quant_or_optim():
    """The model is built and trained by others: late QAT injects its hook (pgolf.quant.qat), the
    optimizer gets the model; no models module reaches back into either package."""
    graph = import_graph(REPO / "pgolf")
    back = [
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.startswith("pgolf.models")
        for b in targets
        if b.startswith(("pgolf.quant", "pgolf.optim"))
    ]
    assert not back, back


def test_worker_modules_load_without_pgolf_parent():
    """Nothing of pgolf.parent ships, nor a shim that imports it at load (pgolf.parent.pack's one
    rule), so any other module may reach them only lazily, inside a function a packed run never
    calls (pgolf.shipped's packer, pgolf.train's relay): at module level it could not load there."""
    graph = import_graph(REPO / "pgolf")
    parent = {m for m in graph if m == "pgolf.parent" or m.startswith("pgolf.parent.")}
    shims = {
        m for m in graph if m not in parent and any(MODULE in graph[m][t] for t in graph[m] if t in parent)
    }
    assert {"pgolf.run", "pgolf.pack", "pgolf.report", "pgolf.report.__main__"} <= shims
    assert "pgolf.parent.pack" in graph["pgolf.shipped"]  # the lazy edge the rule allows
    loads = [
        f"{a} -> {b}"
        for a in graph
        if a not in parent | shims
        for b, kinds in graph[a].items()
        if b in parent | shims and MODULE in kinds
    ]
    assert not loads, loads


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_a_planted_cycle_is_found_and_named_with_its_kinds(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "a.py": "from pkg.b import thing\n",
            "b.py": "def thing():\n    from pkg import c\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
            "free.py": "import pkg.a\n",  # imports into the cycle, not part of it
        },
    )
    graph = import_graph(pkg)
    (component,) = cycles(graph)
    assert component == ["pkg.a", "pkg.b", "pkg.c"]
    text = describe(graph, component)
    assert "pkg.a -> pkg.b [module]" in text
    assert "pkg.b -> pkg.c [function]" in text
    assert "pkg.c -> pkg.a [type]" in text
    assert text.startswith("cycle: pkg.a [module] -> pkg.b [function] -> pkg.c [type] -> pkg.a\n")
    # with the lazy import gone, nothing is left
    (pkg / "b.py").write_text("def thing():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def test_from_imports_resolve_to_submodules_or_the_package(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "sub/__init__.py": "from .leaf import x\n",
            "sub/leaf.py": "from .. import top\nx = 1\n",
            "top.py": "from pkg.sub import x\n",  # a name of pkg.sub, so an edge to the package
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.leaf": {MODULE}}
    assert graph["pkg.sub.leaf"] == {"pkg.top": {MODULE}}
    assert graph["pkg.top"] == {"pkg.sub": {MODULE}}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top"]]
