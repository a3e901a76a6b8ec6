"""The packaged recipes (`imagenet/supcon_resnet50` is `recipes/imagenet/supcon_resnet50.yaml`), found from any
directory: `--config NAME` takes a path (which wins when it exists) or a recipe's name.

The YAML files ship inside the package (setup.py's package_data), so a pip-installed user has them too;
`supcon-scale recipes` lists them.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CHECKOUT_PREFIX = "configs/"  # where the recipes lay in a checkout before they were packaged; still accepted
GPU_LINE = re.compile(r"^#.*?\bGPUs\b[^:]*:\s*(\d+) without activation\s*(?:#\s*)?checkpointing.*?(\d+) with", re.S)


def names() -> list[str]:
    """Every recipe's name (`imagenet/supcon_resnet50`), sorted."""
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.glob("*/*.yaml"))


def path(name: str) -> Path:
    """The file of the recipe `name` (`demo/digits`); it may not exist."""
    return ROOT / f"{name.removesuffix('.yaml')}.yaml"


def find(config: str | Path) -> Path:
    """`config` itself when it is a file; else the packaged recipe it names; else `config` (the reader says so).

    Accepted names: `imagenet/supcon_resnet50`, `imagenet/supcon_resnet50.yaml` and the checkout's old
    `configs/imagenet/supcon_resnet50.yaml`.
    """
    given = Path(config)
    if given.is_file():
        return given
    name = str(config).removeprefix("./").removeprefix(CHECKOUT_PREFIX)
    if not name or given.is_absolute() or ".." in Path(name).parts:
        return given
    packaged = path(name) if Path(name).suffix in ("", ".yaml") else ROOT / name
    return packaged if packaged.is_file() else given


def gpus_stated(name: str) -> str | None:
    """The GPU count a recipe's own header states (`# GPUs (...): 32 without activation checkpointing ..., 8 with`)."""
    header = "".join(line for line in path(name).read_text().splitlines(keepends=True) if line.startswith("#"))
    match = GPU_LINE.search(header)
    if match is None:
        return None
    return f"{match.group(1)} ({match.group(2)} with activation checkpointing)"
