"""The recipes ship inside the package (issue 26 item 2): found by name from any directory, a path wins, listed by
`supcon-scale recipes`; and a wheel installed outside the checkout finds them too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supcon_scale import cli, config, recipes

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "supcon_scale" / "recipes"


@pytest.mark.parametrize(
    "given", ["imagenet/supcon_resnet50", "imagenet/supcon_resnet50.yaml", "configs/imagenet/supcon_resnet50.yaml"]
)
def test_a_recipe_name_finds_its_file_from_any_directory(given: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipes.find(given) == FOLDER / "imagenet" / "supcon_resnet50.yaml"
    assert config.load(given).data.global_batch_size == 6144  # the recipe's own value (default: 256)


def test_a_file_at_the_path_wins_over_the_recipe(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "supcon_resnet50.yaml").write_text("data:\n  global_batch_size: 64\n")
    assert config.load("imagenet/supcon_resnet50.yaml").data.global_batch_size == 64
    assert config.load("imagenet/supcon_resnet50").data.global_batch_size == 6144  # no such file: the recipe


@pytest.mark.parametrize("given", ["imagenet/supcon_resnet5", "nothing.yaml", "../recipes/demo/digits"])
def test_neither_a_file_nor_a_recipe_is_refused_naming_it(given: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "show", "--config", given]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file not found" in err[0] and given in err[0], err


def _by_hand(name: str) -> dict:
    """The recipe read by hand: its YAML merged over its `base:` files (one level is all the recipes use)."""
    own = yaml.safe_load((FOLDER / f"{name}.yaml").read_text())
    base = yaml.safe_load((FOLDER / name).parent.joinpath(own.pop("base")).read_text()) if "base" in own else {}
    for section, values in own.items():
        base[section] = {**base[section], **values} if isinstance(values, dict) and section in base else values
    return base


def test_recipes_lists_every_packaged_recipe_with_model_batch_and_gpus(capsys):
    assert cli.main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    files = sorted(str(p.relative_to(FOLDER).with_suffix("")) for p in FOLDER.rglob("*.yaml"))
    assert sorted(rows) == files
    for name in files:
        raw = _by_hand(name)
        assert rows[name]["model"] == raw["model"]["encoder"], name
        if not name.startswith("continual/"):
            assert rows[name]["global_batch"] == str(raw["data"]["global_batch_size"]), name
    # the GPU counts as the headers state them (docs/ENGINES.md "Memory")
    assert rows["imagenet/supcon_resnet50"]["gpus"] == "32 (8 with activation checkpointing)"
    assert rows["imagenet/supcon_resnet200"]["gpus"] == "64 (8 with activation checkpointing)"
    assert rows["cifar/supcon_resnet50"]["gpus"] == "4 (2 with activation checkpointing)"
    assert rows["imagenet/simclr_resnet50"]["gpus"] == "not stated"  # a `device: cuda` recipe without a count
    assert rows["continual/digits"]["global_batch"] == "10 + 100 replayed"
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) + 1 and lines[files.index("demo/digits")].split()[:4] == [
        "demo/digits", "resnet18", "batch", "256"
    ]  # fmt: skip


def test_an_installed_wheel_finds_its_recipes_outside_the_checkout(tmp_path: Path):
    """setup.py's package_data: a non-editable install (a wheel, installed with --target) carries the recipes."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "supcon_scale", src / "supcon_scale", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], check=True)
    wheel = next((tmp_path / "dist").glob("supcon_scale-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # the installed copy, not the checkout
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "supcon_scale.cli", *args],
        cwd=away,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    listed = run("recipes", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"] for r in json.loads(listed.stdout)} >= {"imagenet/supcon_resnet50", "demo/digits"}
    shown = run("config", "show", "--config", "imagenet/supcon_resnet50", "--json")
    assert shown.returncode == 0, shown.stderr
    batch = next(r for r in json.loads(shown.stdout) if r["key"] == "data.global_batch_size")
    assert batch["value"] == 6144
    where = subprocess.run(
        [sys.executable, "-c", "import supcon_scale.recipes as r; print(r.find('demo/digits'))"],
        cwd=away, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()) == tmp_path / "site" / "supcon_scale" / "recipes" / "demo" / "digits.yaml"
