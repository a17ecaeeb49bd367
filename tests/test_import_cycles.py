"""No import cycles: among st_ar's modules and the scripts in benchmarks/, no module imports (directly or
through others) a module that imports it back.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` statement counts,
at the top of a file or inside a function (a deferred import still ties the two modules together), with
relative imports resolved against the module's package. ``from package import name`` points at the
submodule when ``name`` is one, else at the package. benchmarks/*.py import each other by bare name
(their folder is on sys.path), so a bare name that is a file there means that file.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for st_ar (packages by their __init__.py) and benchmarks/*.py."""
    modules = {}
    for path in sorted((REPO / "st_ar").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        modules[f"benchmarks.{path.stem}"] = path
    return modules


def _resolve(name: str, modules: dict[str, Path], here: str) -> str | None:
    """The module of ours that ``import name`` (absolute) loads, or None when it is not ours."""
    if here.startswith("benchmarks.") and f"benchmarks.{name.split('.')[0]}" in modules:
        name = f"benchmarks.{name}"
    while name and name not in modules:  # `import st_ar.data.codes.x` -> the deepest module that exists
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..data import y
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # a submodule when the name is one, else the module the name is defined in
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules, module)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one cycle through it (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, staying inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_the_graph_sees_relative_deferred_and_bare_benchmark_imports():
    graph = import_graph()
    assert "st_ar.data.codes" in graph["st_ar.data.views"]  # from .codes import ...
    assert "st_ar.commands.probe" in graph["st_ar.commands.eval"]  # from . import probe
    assert "benchmarks.results_report" in graph["benchmarks.reproduce"]  # a bare name, inside main()
    assert all(not m.startswith(("torch", "numpy")) for deps in graph.values() for m in deps)


def test_cycle_finder_names_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
