"""docs/RECIPES.md against the recipes: every table value is what the resolved config (or protocol) holds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from supcon_scale import config, recipes
from supcon_scale.evaluation import linear

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RECIPES.md"
RECIPES = [name for name in recipes.names() if name.startswith(("imagenet/", "cifar/"))]
OFFICIAL_SCRIPTS = [
    "supcon_imagenet_resnet50.sh", "supcon_imagenet_resnet101.sh", "supcon_imagenet_resnet200.sh",
    "supcon_cifar10_resnet50.sh", "simclr_imagenet_resnet50.sh", "simclr_cifar10_resnet50.sh",
    "cross_entropy_imagenet_resnet50.sh", "cross_entropy_imagenet_resnet200.sh", "cross_entropy_cifar10_resnet50.sh",
    "train_classification_head_from_pretrained_encoder.sh",  # every script of supcon/scripts/ but configs.sh
]  # fmt: skip


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_doc(text: str) -> dict[str, dict]:
    """{recipe path: {"base": path | None, "rows": {key: value text}}} from the `## \\`imagenet/...\\`` sections."""
    sections: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^## `((?:imagenet|cifar)/[^`]+)`", line)
        if head:
            current = sections.setdefault(head.group(1), {"base": None, "rows": {}})
            continue
        if current is None:
            continue
        base = re.match(r"^Base: `([^`]+)`", line)
        if base:
            current["base"] = base.group(1)
        cells = _cells(line) if line.startswith("|") else []
        if len(cells) == 5 and cells[2].startswith("`") and not set(cells[0]) <= {"-"}:
            key, value = cells[2].strip("`"), cells[3]
            assert value.startswith("`") and value.endswith("`"), f"{line!r}: the value column must be `code`"
            current["rows"][key] = value.strip("`")
    return sections


SECTIONS = parse_doc(DOC.read_text())


def rows_of(recipe: str) -> dict[str, str]:
    """The section's rows over its base's (a row naming the same key replaces the inherited one)."""
    section = SECTIONS[recipe]
    inherited = rows_of(section["base"]) if section["base"] else {}
    return {**inherited, **section["rows"]}


def resolve(cfg: config.RunConfig, key: str):
    if key.startswith("protocol."):
        _, name, field = key.split(".", 2)
        value = getattr(linear.PRESETS[name], field)
    else:
        value = cfg
        for part in key.split("."):  # a mapping key (model.kwargs.drop_path_rate) by name, a config field by attribute
            value = value[part] if isinstance(value, dict) else getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def same(doc_value, actual) -> bool:
    if isinstance(actual, list):
        return isinstance(doc_value, list) and len(doc_value) == len(actual) and all(map(same, doc_value, actual))
    if isinstance(actual, bool) or isinstance(actual, str) or actual is None:
        return doc_value == actual
    return isinstance(doc_value, (int, float)) and doc_value == pytest.approx(actual, rel=1e-12)


def test_every_recipe_and_official_script_has_a_table():
    assert set(RECIPES) <= set(SECTIONS), f"no docs/RECIPES.md section for {sorted(set(RECIPES) - set(SECTIONS))}"
    text = DOC.read_text()
    for script in OFFICIAL_SCRIPTS:
        assert f"`{script}`" in text, f"docs/RECIPES.md names no recipe for the official {script}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_table_values_are_the_resolved_config(recipe):
    cfg = config.load(recipe)
    rows = rows_of(recipe)
    assert len(rows) >= 4, f"{recipe}: the table has almost no rows"
    for key, text in rows.items():
        actual = resolve(cfg, key)
        assert same(yaml.safe_load(text), actual), (
            f"{recipe}: docs/RECIPES.md says {key} = {text}, the config {actual!r}"
        )


def test_the_parser_sees_a_drifted_value(tmp_path):
    """A wrong value in a table row is caught (the check is not vacuous)."""
    text = DOC.read_text().replace("| `data.global_batch_size` | `6144` |", "| `data.global_batch_size` | `6000` |", 1)
    rows = {**parse_doc(text)["imagenet/supcon_resnet50"]["rows"]}
    cfg = config.load("imagenet/supcon_resnet50")
    assert not same(yaml.safe_load(rows["data.global_batch_size"]), resolve(cfg, "data.global_batch_size"))


def test_protocol_rows_name_real_fields():
    fields = {f.name for f in dataclasses.fields(linear.Preset)}
    for recipe in SECTIONS:
        for key in rows_of(recipe):
            if key.startswith("protocol."):
                _, name, field = key.split(".", 2)
                assert name in linear.PRESETS and field in fields, key


def test_official_cifar_recipe_evaluates_as_stored_with_cifar_whitening():
    cfg = config.load("cifar/supcon_resnet50")
    name, preset = linear.resolve_protocol("official", cfg)
    assert name == "official_cifar" and preset.optimizer == "sgd" and preset.boundaries == (60, 75, 90)
    name, preset = linear.resolve_protocol("official", config.load("imagenet/supcon_resnet50"))
    assert name == "official_imagenet" and preset.optimizer == "rmsprop"
    # the official whitening, given on [-1, 1] inputs (supcon inputs.py), is the config's on 0..1 inputs
    for m, s, m01, s01 in zip((-0.0172, -0.0356, -0.107), (0.4046, 0.3988, 0.402), cfg.data.augment.mean,
                              cfg.data.augment.std, strict=True):  # fmt: skip
        assert (m + 1) / 2 == pytest.approx(m01, abs=1e-4) and s / 2 == pytest.approx(s01, abs=1e-4)
