"""facetrain/data/ and facetrain/evaluation/ have no import cycle, lazy or not, and their torch-free modules
stay torch-free at import (ast only: nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "facetrain"
TORCH_FREE = ["data/images.py", "data/faceset.py", "data/pack_format.py", "evaluation/metrics.py",
              "evaluation/pairfile.py", "evaluation/options.py"]


def imported(path: Path, module_level_only: bool = False) -> set[str]:
    """Modules `path` imports (`from a.b import c` counts a.b and a.b.c), at any depth or at module level."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def module_graph(package: str) -> dict[str, set[str]]:
    files = {f"facetrain.{package}.{f.stem}": f for f in (PACKAGE / package).glob("*.py") if f.stem != "__init__"}
    return {name: imported(path) & set(files) - {name} for name, path in files.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first = last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [node, dep]
            if dep not in state and (found := visit(dep, stack + [node])):
                return found
        state[node] = "done"
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, []))), None)


def test_data_and_evaluation_have_no_import_cycle():
    for package in ("data", "evaluation"):
        found = cycle(module_graph(package))
        assert found is None, f"facetrain/{package}/: import cycle {' -> '.join(found)}"


def test_torch_free_modules_do_not_import_torch_at_module_level():
    for rel in TORCH_FREE:
        top = {m.split(".")[0] for m in imported(PACKAGE / rel, module_level_only=True)}
        heavy = top & {"torch", "torchvision"}
        assert not heavy, f"facetrain/{rel} imports {sorted(heavy)} at module level"


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
