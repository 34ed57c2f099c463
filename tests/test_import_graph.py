"""No import circles between binarydm's modules, counting every import statement.

Module-level imports, ones under ``if TYPE_CHECKING:`` and ones inside function
bodies all count: a lazy or type-only import back still ties two modules into one
design, even when Python would not fail on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "binarydm"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The binarydm modules one import statement names (``from pkg import mod`` -> pkg.mod)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if modules[module].name != "__init__.py":
            package.pop()
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the binarydm modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(module, node, modules):
                while target and target not in modules:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    imported.add(target)
        graph[module] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_type_only_and_function_body_imports():
    graph = import_graph()
    # runs.py imports StudySpec only under TYPE_CHECKING, the plots only inside a method.
    assert "binarydm.spec" in graph["binarydm.tracking._runs"]
    assert "binarydm.tracking._plots" in graph["binarydm.tracking._runs"]
    assert "binarydm.search._sampling" in graph["binarydm.search._driver"]


def test_no_import_circles_between_modules():
    graph = import_graph()
    found = cycles(graph)
    described = [
        " -> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in found
    ]
    assert not found, "import circles: " + "; ".join(described)


def test_the_description_package_sits_below_the_running_one():
    graph = import_graph()
    spec = [m for m in graph if m == "binarydm.spec" or m.startswith("binarydm.spec.")]
    above = ("binarydm.search", "binarydm.tracking", "binarydm.cli")
    for module in spec:
        wrong = sorted(t for t in graph[module] if t.startswith(above))
        assert not wrong, f"{module} imports {wrong}: binarydm.spec must not depend on them"


def test_the_description_package_never_names_ray_optuna_or_mlflow():
    runners = {"ray", "optuna", "mlflow"}
    for path in (PACKAGE / "spec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            wrong = sorted(n for n in names if n.split(".")[0] in runners)
            assert not wrong, f"{path.name} imports {wrong}, even if lazily"
