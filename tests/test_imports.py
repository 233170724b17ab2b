"""The package's import graph: acyclic (deferred imports included), CLIs at the top.

The graph is read from the source with ``ast``, so it sees every ``import``
and ``from ... import`` statement, also those inside functions that only run
later (a deferred import hides a cycle from the interpreter, not from a
reader). An edge ``a -> b`` means module ``a`` imports module ``b``:

* ``import x.y.z`` and ``from x.y.z import name`` -> ``x.y.z``, and
  ``-> x.y.z.name`` as well when ``name`` is a submodule;
* plus the packages above the target (``x.y``), whose ``__init__`` runs first,
  except the packages above ``a`` itself: those are always initialised
  before ``a``, so a package re-exporting its own submodules is no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import maskrcnn_jax

PACKAGE = "maskrcnn_jax"
ROOT = pathlib.Path(maskrcnn_jax.__file__).parent
# The command-line entry points (`python -m ...`). Nothing in the package imports
# them: entry points import the library, never the reverse (and not each other).
CLI_MODULES = {
    f"{PACKAGE}.{name}"
    for name in ("predict", "evaluate", "convert", "train", "export", "data.prepare")
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Intra-package modules that the import statements of ``module`` name.

    ``from x.y import name`` names ``x.y.name`` if that is a submodule, else
    ``x.y``; the packages above a target are added by :func:`import_graph`.
    """
    package = module if _is_package(module) else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # relative: from . / .. import
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            # `import x.y.z` where only x.y is a module of ours names x.y.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (edges as in the module docstring)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_parents = set(_parents(module))
        edges = set()
        for target in _imported(module, tree):
            edges.add(target)
            edges.update(p for p in _parents(target) if p not in own_parents)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component with one."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):  # Tarjan; the graph is small, recursion is fine
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
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:  # a shortest cycle through the smallest name, by BFS
        start = min(scc)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & scc):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def test_graph_sees_deferred_and_relative_imports():
    # Checks the parser itself on known edges, so an empty graph cannot pass.
    graph = import_graph()
    assert f"{PACKAGE}.ops.roi_geometry" in graph[f"{PACKAGE}.ops.roi_align"]
    assert f"{PACKAGE}.ops.roi_align_pallas" in graph[f"{PACKAGE}.ops.poolers"]
    assert f"{PACKAGE}.ops" in graph[f"{PACKAGE}.modeling.box_head"]  # via the package
    source = "def f():\n    from . import boxes\n    from .. import modeling\n    import os\n"
    assert _imported(f"{PACKAGE}.ops.nms", ast.parse(source)) == {
        f"{PACKAGE}.ops.boxes",
        f"{PACKAGE}.modeling",
    }
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("subpackage", ["ops", "modeling", "data", ""])
def test_import_graph_is_acyclic(subpackage):
    # Each subpackage on its own (the graph induced by its modules), then the
    # whole package, so that a failure says where the cycle lies.
    prefix = f"{PACKAGE}.{subpackage}" if subpackage else PACKAGE
    inside = lambda m: m == prefix or m.startswith(prefix + ".")
    graph = {m: {t for t in ts if inside(t)} for m, ts in import_graph().items() if inside(m)}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cli_list_covers_every_main_module():
    # A module that runs as `python -m` is an entry point; the list must know it.
    mains = {m for m, p in MODULES.items() if 'if __name__ == "__main__"' in p.read_text()}
    assert mains, "no entry point found: the scan is broken"
    assert mains <= CLI_MODULES, f"entry points missing from CLI_MODULES: {mains - CLI_MODULES}"


def test_nothing_imports_a_cli():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets & CLI_MODULES)
    assert not bad, "modules import CLI modules: " + ", ".join(bad)
