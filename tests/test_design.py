"""docs/DESIGN.md's layers hold: every import inside the package points to its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "supcon_scale"

# docs/DESIGN.md, "Layers": the top-level name under supcon_scale -> its layer.
LAYERS = {
    "distributed": 0,
    "config": 0,
    "recipes": 0,
    "yamlload": 0,
    "arguments": 0,
    "devices": 0,
    "losses": 1,
    "optim": 1,
    "resilience": 1,
    "hooks": 1,
    "batchnorm": 1,
    "files": 1,
    "weights": 1,
    "engines": 2,
    "objectives": 2,
    "data": 2,
    "models": 2,
    "averaging": 2,
    "checkpoint": 2,
    "export": 2,
    "resume": 2,
    "console": 2,
    "sinks": 2,
    "profiling": 2,
    "trainer": 3,
    "evaluation": 3,
    "continual": 3,
    "cli": 4,
    "demo": 4,
    "bench": 4,
    "doctor": 4,
}
# Pairs inside a layer that must stay apart (importer -> what it must not import).
FORBIDDEN = {
    "data": {"models", "objectives", "engines", "checkpoint"},
    "engines": {"data", "objectives"},
    "losses": {"optim", "resilience", "hooks"},
}


def _unit(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(module: Path) -> set[str]:
    """The top-level supcon_scale units that `module` imports (at any depth of the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "supcon_scale":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "supcon_scale" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in MODULES}
    assert units <= set(LAYERS), f"add to docs/DESIGN.md and LAYERS: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(module: Path):
    unit = _unit(module)
    for imported in _imports(module) - {unit, "__version__"}:
        assert imported in LAYERS, f"{module.name} imports unknown unit {imported}"
        assert LAYERS[imported] <= LAYERS[unit], (
            f"{unit} (layer {LAYERS[unit]}) imports {imported} (layer {LAYERS[imported]})"
        )
        assert imported not in FORBIDDEN.get(unit, set()), f"{unit} must not import {imported} (docs/DESIGN.md)"


def test_nothing_assigns_to_another_modules_attribute():
    """No monkeypatching inside the package: no `module.name = ...` on an imported module."""
    for module in MODULES:
        tree = ast.parse(module.read_text())
        imported = {
            a.asname or a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign)
                else []
            )
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in imported:
                    pytest.fail(f"{module.relative_to(PACKAGE)}:{node.lineno} assigns {t.value.id}.{t.attr}")


# Size limits (docs/DESIGN.md, "Size"): a module a newcomer reads whole, a function on one screen.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# Functions that are data tables (one entry per line) may run longer: "path:qualified name". None today.
_DATA_TABLES: set[str] = set()


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, lines from `def` to its last line) of every function and method, nested ones included."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((prefix + node.name, node.end_lineno - node.lineno + 1))
            out += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
        else:
            out += _functions(node, prefix)
    return out


def test_modules_and_functions_stay_small():
    too_big = []
    for module in MODULES:
        rel = str(module.relative_to(PACKAGE))
        text = module.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {len(text.splitlines())} lines > {MAX_MODULE_LINES}")
        for name, lines in _functions(ast.parse(text)):
            where = f"{rel}:{name}"
            if lines > MAX_FUNCTION_LINES and where not in _DATA_TABLES:
                too_big.append(f"{where}: {lines} lines > {MAX_FUNCTION_LINES}")
    assert not too_big, "split by concern (a new module goes into docs/DESIGN.md's layer table): " + "; ".join(too_big)


def test_the_size_allowlists_name_only_what_exists_and_is_too_big():
    """A stale entry (a module or function split since, or renamed) would silently exempt its successor."""
    sizes = {}
    for module in MODULES:
        rel = str(module.relative_to(PACKAGE))
        text = module.read_text()
        sizes[rel] = (len(text.splitlines()), MAX_MODULE_LINES)
        sizes.update({f"{rel}:{n}": (lines, MAX_FUNCTION_LINES) for n, lines in _functions(ast.parse(text))})
    for entry in sorted(_DATA_TABLES):
        assert entry in sizes and sizes[entry][0] > sizes[entry][1], f"remove {entry} from the allowlist"


# docs/DESIGN.md: only distributed.py and engines/ touch torch.distributed (the process group and its collectives).
# resilience.py runs torchrun's own launcher (`supcon-scale torchrun`): the agent, never a process group.
_DIST_OWNERS = ("distributed.py", "engines/")
_LAUNCHER_ONLY = {"resilience.py": {"torch.distributed.run", "torch.distributed.elastic.multiprocessing.api",
                                    "torch.distributed.elastic.multiprocessing.errors"}}  # fmt: skip


def _torch_distributed_imports(module: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module
            else []
        )
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names = [f"torch.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            names = [f"torch.distributed.{a.name}" for a in node.names]
        found |= {n for n in names if n == "torch.distributed" or n.startswith("torch.distributed.")}
    return found


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_distributed_and_engines_touch_torch_distributed(module: Path):
    rel = str(module.relative_to(PACKAGE))
    if rel.startswith(_DIST_OWNERS):
        return
    extra = _torch_distributed_imports(module) - _LAUNCHER_ONLY.get(rel, set())
    assert not extra, f"{rel} imports {sorted(extra)}: collectives belong in distributed.py (docs/DESIGN.md)"
