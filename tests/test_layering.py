"""The package's layering, read from the source with ast (nothing is imported).

facetrain's sub-packages form a stack: each may import itself and the packages to its left, never one to its right,
at module level or inside a function. The commands (facetrain/<command>.py, cli.py) sit on top. The modules a
command needs before its arguments are parsed (and those the torch-free deployment path runs on) must not import
torch at module level, directly or through another facetrain module. docs/architecture.md describes the same stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "facetrain"

# lowest first; "commands" is every top-level module except errors.py
LAYERS = ("errors", "config", "runtime", "data", "alignment", "model", "deploy", "evaluation", "training", "commands")
HEAVY = ("torch", "torchvision", "timm", "accelerate", "pytorch_metric_learning", "sklearn", "matplotlib")
# modules that must load without torch: configuration, the ONNX/HTTP deployment path, metrics, file-format readers
# and every command (commands import their heavy machinery after the arguments parse, so --help and user errors are
# instant)
TORCH_FREE_PACKAGES = ("config", "deploy")
TORCH_FREE_MODULES = ("facetrain.errors", "facetrain.runtime.atomic_dir", "facetrain.runtime.threads",
                      "facetrain.data.images", "facetrain.data.faceset", "facetrain.data.pack_format",
                      "facetrain.data.preflight", "facetrain.data.audit",
                      "facetrain.alignment.check", "facetrain.model.files", "facetrain.model.card",
                      "facetrain.evaluation.metrics",
                      "facetrain.evaluation.pairfile", "facetrain.evaluation.options",
                      "facetrain.evaluation.benchmarks", "facetrain.evaluation.bootstrap")
TORCH_NEEDING = ("facetrain.deploy.export",)  # exports a torch model; imports torch in its functions only


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a module or of a name inside one: its sub-package, errors, or the commands on top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "commands"


def imports(tree: ast.AST, module: str, known: set[str], top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the tree, or only those executed when the module loads."""
    nodes = _top_level(tree) if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
                      for alias in node.names]
    return found


def _top_level(tree: ast.AST):
    """Statements run at import: the module body and blocks nested in it, not function or class bodies' functions."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            continue
        stack += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def parse_package(root: Path) -> dict[str, ast.AST]:
    return {module_name(p, root): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def upward_imports(trees: dict[str, ast.AST]) -> list[str]:
    problems = []
    for module, tree in trees.items():
        here = LAYERS.index(layer_of(module))
        for line, target in imports(tree, module, set(trees)):
            if target.split(".")[0] != "facetrain" or target == "facetrain":
                continue
            there = LAYERS.index(layer_of(target))
            if there > here:
                problems.append(f"{module}:{line} imports {target} ({layer_of(target)} is right of {layer_of(module)})")
    return problems


def import_cycles(trees: dict[str, ast.AST]) -> list[list[str]]:
    """Every cycle of the module graph (lazy imports included), as the strongly connected components of size > 1."""
    known = set(trees)
    graph = {m: sorted({t for _, t in imports(tree, m, known) if t in known and t != m}) for m, tree in trees.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return cycles


def heavy_at_import(trees: dict[str, ast.AST]) -> dict[str, str]:
    """module -> why it loads torch (or another heavy library) when imported, following facetrain imports."""
    direct = {m: [t for _, t in imports(tree, m, set(trees), top_level_only=True)] for m, tree in trees.items()}
    why: dict[str, str] = {}

    def reason(module: str, seen: tuple[str, ...] = ()) -> str | None:
        if module in why:
            return why[module]
        for target in direct.get(module, []):
            if target.split(".")[0] in HEAVY:
                why[module] = f"imports {target}"
                return why[module]
            if target in trees and target not in seen:
                # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                deeper = reason(target, seen + (module,))
                if deeper:
                    why[module] = f"imports {target}, which {deeper}"
                    return why[module]
        return None

    for module in trees:
        reason(module)
    return why


def torch_free(module: str) -> bool:
    if module in TORCH_NEEDING:
        return False
    return (layer_of(module) == "commands" or module in TORCH_FREE_MODULES
            or layer_of(module) in TORCH_FREE_PACKAGES)


TREES = parse_package(PACKAGE)


def test_packages_are_the_documented_layers():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"errors", "commands"}
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for package in packages:
        assert f"`{package}/`" in doc, f"docs/architecture.md has no row for {package}/"


def test_no_package_imports_one_to_its_right():
    assert upward_imports(TREES) == []


def test_no_import_cycles():
    assert import_cycles(TREES) == []


def test_sub_package_inits_are_empty():
    # re-exporting from __init__ would load torch for every module of the package
    for init in PACKAGE.glob("*/__init__.py"):
        assert init.read_text().strip() == "" or init.read_text().strip().startswith('"""'), init


@pytest.mark.parametrize("module", sorted(m for m in TREES if torch_free(m)))
def test_torch_free_modules_do_not_load_torch(module):
    assert module not in heavy_at_import(TREES), f"{module} {heavy_at_import(TREES)[module]}"


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, ast.AST]:
    root = tmp_path / "facetrain"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {module_name(p, root): ast.parse(p.read_text()) for p in root.rglob("*.py")}


def test_the_checks_see_an_upward_import_a_cycle_and_torch(tmp_path):
    # the checks themselves must be able to fail: a lazy upward import, a cycle, and torch behind a facetrain import
    trees = _fake_package(tmp_path, {
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from facetrain.training.trainer import Trainer\n",
        "data/b.py": "import facetrain.data.c\n",
        "data/c.py": "from facetrain.data import b\n",
        "config/__init__.py": "",
        "config/x.py": "from facetrain.data.d import thing\n",
        "data/d.py": "if True:\n    import torch\n",
    })
    assert any("facetrain.data.a:2 imports facetrain.training.trainer" in p for p in upward_imports(trees))
    assert any("config" in p for p in upward_imports(trees))
    assert ["facetrain.data.b", "facetrain.data.c"] in import_cycles(trees)
    assert "torch" in heavy_at_import(trees)["facetrain.config.x"]


def environment_readers(trees: dict[str, ast.AST]) -> list[str]:
    """Library modules outside runtime/ that touch os.environ or os.getenv (the commands and runtime/ may)."""
    found = []
    for module, tree in trees.items():
        if layer_of(module) in ("runtime", "commands"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") and (
                    isinstance(node.value, ast.Name) and node.value.id == "os"):
                found.append(f"{module}:{node.lineno} uses os.{node.attr}")
    return found


def test_only_runtime_and_the_commands_read_the_environment():
    assert environment_readers(TREES) == []
    fake = {"facetrain.data.x": ast.parse("import os\nSEED = os.environ.get('SEED')\n")}
    assert environment_readers(fake) == ["facetrain.data.x:2 uses os.environ"]
