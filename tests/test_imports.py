"""The package's import graph: no cycles, and pure math stays pure.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` anywhere in a module (module level and inside functions; relative and
absolute) that names a ``tensorslim`` module is an edge. Importing ``a.b.c`` also runs the
packages ``a.b`` and ``a`` first, so those are edges too (except the importer's own parent
packages, which are already being imported). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module. Imports under ``if TYPE_CHECKING:`` never run and are
left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "tensorslim"
# subpackages of pure math: they may import nothing of the package outside themselves,
# except the modules listed (rank/ works on tensors with tensor/'s helpers)
PURE = {"tensorslim.tensor": (), "tensorslim.rank": ("tensorslim.tensor",)}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _targets(name: str, tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports (directly named, before parent packages)."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules that importing or running it imports}."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for t in _targets(name, tree, modules):
            parts = t.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                         if p in modules and p not in own)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_the_graph_is_read_from_the_source():
    g = import_graph()
    # known edges of each kind: module level, function level, relative, parent package
    assert "tensorslim.plan" in g["tensorslim.surgery"]
    assert "tensorslim.layers" in g["tensorslim.surgery"]  # function-level import
    assert "tensorslim.tensor" in g["tensorslim.layers.cp"]  # relative, two levels
    assert "tensorslim.planning" in g["tensorslim.methods.oneshot"]
    assert len(g) > 40


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("pure", sorted(PURE))
def test_pure_math_imports_no_other_package_module(pure):
    allowed = PURE[pure]
    g = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in g.items() if m == pure or m.startswith(pure + ".")
                 for t in ts if not (t == pure or t.startswith(pure + ".")
                                     or any(t == a or t.startswith(a + ".") for a in allowed)))
    assert not bad, f"{pure} must import nothing of tensorslim outside {(pure,) + allowed}: {bad}"


@pytest.mark.parametrize("leaf", ["tensorslim.files", "tensorslim.statedict", "tensorslim.configs"])
def test_file_and_state_helpers_are_leaves(leaf):
    assert import_graph()[leaf] == set()  # every writer / loader may import them, cycle-free


def test_data_sits_below_logic():
    g = import_graph()
    assert g["tensorslim.plan"] <= {"tensorslim.files"}  # data and JSON only
    below = {"tensorslim.plan", "tensorslim.surgery", "tensorslim.cost", "tensorslim.io"}
    assert not {m for m in below if any(t.startswith("tensorslim.planning") for t in g[m])}
    assert "tensorslim.io" not in g["tensorslim.models.checkpoint"]
