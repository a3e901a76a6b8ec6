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
    "losses": 1,
    "optim": 1,
    "resilience": 1,
    "hooks": 1,
    "files": 1,
    "weights": 1,
    "engines": 2,
    "objectives": 2,
    "data": 2,
    "models": 2,
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
