"""supcon_scale/arguments.py: the light parsers repeat a few values of heavy modules; each copy matches its origin."""

from __future__ import annotations

import importlib

import pytest

from supcon_scale import arguments


def test_the_repeated_values_match_the_modules_they_come_from():
    from supcon_scale.evaluation import corruptions, linear

    assert arguments.PROTOCOL_NAMES == linear.PROTOCOL_NAMES
    args = arguments.imagenet_c().parse_args(["--c-root", "c"])
    assert args.corruptions == list(corruptions.CORRUPTIONS)
    assert args.severities == list(corruptions.SEVERITIES)
    assert args.work_size == corruptions.MIN_SIDE


# command -> (module, the part of its docstring that was the description before the parser moved here)
DESCRIBED_BY = {
    "check-data": ("supcon_scale.data.badfiles", lambda m: m.main.__doc__),
    "make-shards": ("supcon_scale.data.shards", lambda m: m.main.__doc__),
    "finetune": ("supcon_scale.evaluation.finetune", lambda m: m.__doc__.splitlines()[0]),
    "demo": ("supcon_scale.demo", lambda m: m.__doc__),
    "continual": ("supcon_scale.continual.run", lambda m: m.__doc__),
    "bench-dataloader": ("supcon_scale.bench.loader", lambda m: m.main.__doc__),
    "bench-train": ("supcon_scale.bench.train", lambda m: m.__doc__),
    "embed-plot": ("supcon_scale.evaluation.embedding", lambda m: m.__doc__.split("\n\n")[0]),
}


@pytest.mark.parametrize("command", sorted(DESCRIBED_BY))
def test_a_description_is_its_modules_docstring(command: str):
    module, doc = DESCRIBED_BY[command]
    assert arguments.PARSERS[command]().description == doc(importlib.import_module(module))
