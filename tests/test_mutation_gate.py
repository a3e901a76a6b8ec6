"""tools/mutation.py stays a gate: every planted snippet is found once in its file, and its tests exist.

A refactor that moves the line a mutation plants into would otherwise make `make test-mutation` report the mutation
as not applicable instead of killed or survived, and the gate would shrink without anyone seeing it.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mutations() -> list:
    spec = importlib.util.spec_from_file_location("mutation_gate", REPO / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_gate"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = _mutations()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_plants_into_one_place_and_names_tests_that_exist(mutation):
    source = (REPO / mutation.path).read_text()
    assert source.count(mutation.old) == 1, f"{mutation.path}: the snippet is found {source.count(mutation.old)} times"
    assert mutation.old != mutation.new
    for node in mutation.tests:
        file, _, name = node.partition("::")
        assert (REPO / file).is_file(), node
        if name:
            tree = ast.parse((REPO / file).read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name.split("[")[0] in defined, node


def test_mutation_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
