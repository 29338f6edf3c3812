"""The package's shape, as ARCHITECTURE.md states it: imports point down the stages, no import circles, no
function-level imports but of optional heavy dependencies, no function over 80 lines, no citation of files outside
the repository. (Cyclomatic complexity is ruff's C901 at 15, in pyproject.toml.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_dpo"
# Bottom to top; a module may import from its own unit and from the units before it. Kept in step with
# ARCHITECTURE.md's picture.
LAYERS = ["errors", "library_noise", "losses", "config", "models", "data", "export", "inference", "training",
          "feedback", "evaluation", "iterate", "world", "cli"]
OPTIONAL = ("bitsandbytes", "matplotlib", "torch.utils.tensorboard", "tensorboard", "deepspeed")
MAX_LINES = 80


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> set[str]:
    return {_name(p) for p in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__ (the public API, lazy)


def _imports(tree: ast.AST, top_level_only: bool):
    """(line, module name) of each ``lora_dpo`` import; module-level statements only, or inside functions only."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside != top_level_only:
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:  # ``from package import module`` imports that module; ``from module import name``, the module
                    names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in MODULES else child.module or ""
                             for a in child.names]
                out.extend((child.lineno, n) for n in names)
            visit(child, inside)

    visit(tree, False)
    return out


MODULES = _all_modules()


@pytest.fixture(scope="module")
def trees():
    return {_name(p): (p, ast.parse(p.read_text())) for p in _modules()}


def test_every_unit_is_in_the_layer_list(trees):
    units = {_unit(m) for m in trees} - {None}
    assert units <= set(LAYERS), units - set(LAYERS)


def test_imports_point_down_the_stages(trees):
    wrong = []
    for module, (path, tree) in trees.items():
        unit = _unit(module)
        if unit is None:
            continue
        for line, imported in _imports(tree, top_level_only=True):
            if not imported.startswith("lora_dpo."):
                continue
            target = _unit(imported)
            if target != unit and LAYERS.index(target) > LAYERS.index(unit):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {unit} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_its_own_package(trees):
    """A module imports its siblings, never its package's ``__init__`` (which re-exports the siblings: a circle)."""
    wrong = []
    for module, (path, tree) in trees.items():
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else None
        for line, imported in _imports(tree, top_level_only=True):
            if package and package != "lora_dpo" and imported == package:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles(trees):
    graph = {m: set() for m in trees}
    for module, (_, tree) in trees.items():
        for _, imported in _imports(tree, top_level_only=True):
            while imported and imported not in trees:  # lora_dpo.a.b.name -> lora_dpo.a.b
                imported = imported.rpartition(".")[0]
            if imported and imported != module:
                graph[module].add(imported)
    state, circles = {}, []

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not circles, "\n".join(circles)


def test_function_level_imports_only_for_optional_heavy_dependencies(trees):
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line} {imported}"
             for _, (path, tree) in trees.items() for line, imported in _imports(tree, top_level_only=False)
             if not imported.startswith(OPTIONAL)]
    assert not wrong, "\n".join(wrong)


def test_no_function_over_80_lines(trees):
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for _, (path, tree) in trees.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "\n".join(long)


def test_sources_cite_only_files_in_the_repository():
    cited = [str(p.relative_to(PACKAGE.parent)) for p in _modules() if "DESIGN.md" in p.read_text()]
    assert not cited, cited
