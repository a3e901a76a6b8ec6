"""Install truth (issue 26): one Python floor everywhere it is written, bounds on the libraries whose internals are
used, and the corruptions behind the `robustness` extra with a one-line message when it is missing.

Offline: whether the registry has every pin for the floor is `make check-constraints` (network)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs() -> dict:
    """setup()'s literal keyword arguments, read from setup.py's syntax tree (running it would build nothing)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # long_description reads a file
            continue
    return out


def _floor() -> tuple[int, int]:
    match = re.fullmatch(r">=(\d+)\.(\d+)", _setup_kwargs()["python_requires"])
    assert match, "python_requires must be one floor, >=X.Y"
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize("name", ["constraints.txt", "constraints-cu12.txt"])
def test_constraints_state_setup_pys_python_floor(name: str):
    marks = re.findall(r"^# python_requires: >=(\d+)\.(\d+)", (ROOT / name).read_text(), re.MULTILINE)
    assert [tuple(map(int, m)) for m in marks] == [_floor()]


def test_readme_and_this_interpreter_agree_with_the_floor():
    major, minor = _floor()
    assert (major, minor) >= (3, 11)  # numpy 2.4.6, scipy 1.17.1 (the pins) have no release for 3.10
    assert sys.version_info[:2] >= (major, minor)
    assert f"Python {major}.{minor} or newer" in (ROOT / "README.md").read_text()


def _requirement(reqs: list[str], name: str) -> str:
    found = [r for r in reqs if re.match(rf"{re.escape(name)}\b(?![-\w])", r)]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


@pytest.mark.parametrize(
    "extra, name, pinned",
    [
        (None, "timm", "timm"),
        ("deepspeed", "deepspeed", "deepspeed"),
        ("dali", "nvidia-dali-cuda130", "nvidia-dali-cuda130"),
        ("dali-cuda120", "nvidia-dali-cuda120", None),
    ],
)
def test_libraries_whose_internals_are_used_have_an_upper_bound_admitting_the_pin(extra, name, pinned):
    kwargs = _setup_kwargs()
    reqs = kwargs["install_requires"] if extra is None else kwargs["extras_require"][extra]
    upper = re.search(r"<([\d.]+)", _requirement(reqs, name))
    assert upper, f"{name} needs an upper bound"
    if pinned:  # the tested release lies below the bound
        pin = re.search(rf"^{re.escape(pinned)}==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
        as_tuple = [tuple(int(x) for x in v.split(".")) for v in (pin.group(1), upper.group(1))]
        assert as_tuple[0] < as_tuple[1]


def test_corruptions_are_an_extra_not_a_dependency():
    kwargs = _setup_kwargs()
    heavy = ("imagecorruptions", "opencv", "scikit-image")
    assert not [r for r in kwargs["install_requires"] if r.startswith(heavy)]
    assert {r.split(">")[0] for r in kwargs["extras_require"]["robustness"]} >= {"imagecorruptions", "scikit-image"}
    assert "robustness" in re.search(r"^EXTRAS \?= (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


@pytest.mark.parametrize(
    "module, error",
    [
        ("imagecorruptions", "No module named 'imagecorruptions'"),  # installed without the extra
        # ("cv2", "libGL.so.1: ...", a bare container) takes the same path: one case keeps the suite's time
    ],
)
def test_imagenet_c_without_the_extra_is_one_line_naming_it(tmp_path: Path, module: str, error: str):
    hidden = tmp_path / "hidden" / module
    hidden.mkdir(parents=True)  # first on the path of this process and of its workers: importing it fails as named
    (hidden / "__init__.py").write_text(f"raise ImportError({error!r})\n")
    src = tmp_path / "val"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 60 * c, np.uint8)).save(src / f"c{c}" / "a.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "supcon_scale.cli", "imagenet-c", "--generate-from", str(src)]
    cmd += ["--c-root", str(tmp_path / "c"), "--corruptions", "frost", "--severities", "1", "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'supcon_scale[robustness]'" in lines[0], proc.stderr
    assert error in lines[0]
    assert not list((tmp_path / "c").rglob("*.jpg"))
