"""The architecture holds: no import cycles, Prefect only in flows/ and the thin task wrappers, nodes never import flows."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nodes", "flows")
# What a node module may take from Prefect: the decorator and cache policy of its thin task wrappers.
TASK_WRAPPER_IMPORTS = {("prefect", "task"), ("prefect.cache_policies", "NO_CACHE")}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """Every import in a module that can run, at any depth (inside functions too): (module, name or None, line).
    Imports under `if TYPE_CHECKING:` never run (annotations only), so they make no cycle."""
    found = []
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in (n for n in ast.walk(tree) if id(n) not in typing_only):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from a import b` counts a.b when b is a module)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, imported, _ in imports(path):
            if f"{module}.{imported}" in modules:
                targets.add(f"{module}.{imported}")
            elif module in modules:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_project_modules_including_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 20 and graph["flows.generate"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nodes_import_no_flows_and_prefect_only_for_their_task_wrappers():
    for name, path in project_modules().items():
        if not name.startswith("nodes"):
            continue
        for module, imported, line in imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            assert not module.startswith("flows"), f"{where} imports {module}"
            if module.split(".")[0] == "prefect":
                assert (module, imported) in TASK_WRAPPER_IMPORTS, f"{where} imports {module} {imported or ''}"


def test_no_test_module_imports_another():
    """Shared test code lives in tests/support/ and fixtures in conftest.py, so each test module stands alone."""
    for path in (ROOT / "tests").glob("test_*.py"):
        for module, imported, line in imports(path):
            named = f"{module}.{imported}" if imported else module
            assert not named.startswith(("tests.test_", "tests.conftest")), f"{path.name}:{line} imports {named}"
