"""The core's import graph: no cycle among bridge/ modules (imports under TYPE_CHECKING count too).
The layout's rules (bridge/ imports nothing from adapters/, platforms not from each other) are
tests/unit/test_house.py's."""

from __future__ import annotations

import ast
from pathlib import Path

BRIDGE = Path(__file__).resolve().parents[2] / "bridge"


def module_name(path: Path, root: Path = BRIDGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str], root: Path = BRIDGE) -> set[str]:
    """Every bridge module ``path`` imports anywhere in its text (function bodies and
    ``if TYPE_CHECKING:`` blocks included); ``from bridge import logging`` names ``bridge.logging``."""
    name = module_name(path, root)
    package = name.rpartition(".")[0] if path.name != "__init__.py" else name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != "bridge"}


def graph(root: Path = BRIDGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imported(path, set(paths), root) - {name} for name, path in paths.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "bridge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from bridge import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bridge.a import X\n"
    )
    assert find_cycle(graph(pkg)) == ["bridge.a", "bridge.b", "bridge.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle_in_bridge() -> None:
    edges = graph()
    assert "bridge.daemon" in edges["bridge.cli"]  # imports inside functions are read too
    assert find_cycle(edges) is None, f"import cycle: {' → '.join(find_cycle(edges) or [])}"


def test_web_does_not_import_the_daemon() -> None:
    assert "bridge.daemon" not in graph()["bridge.web"]
