"""Check that every pin of the constraints files has a release for setup.py's Python floor (`make check-constraints`).

Asks the package registry (network) through pip: `pip index versions NAME --python-version FLOOR` lists only the
releases pip would install for that Python (wheel tags and Requires-Python both apply), so a pin missing from the
list cannot be installed there; `pip download --python-version 3.10 numpy==2.4.6` fails for the same reason. Pins
with a local version label (`torch==2.14.1+cu128`) live on PyTorch's own index, which the registry does not serve:
they are listed as not checked unless `--extra-index-url` names that index.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)")


def python_floor(setup_py: Path = ROOT / "setup.py") -> str:
    """The X.Y of setup.py's `python_requires=">=X.Y"`."""
    match = re.search(r'python_requires=">=(\d+\.\d+)"', setup_py.read_text())
    if match is None:
        raise SystemExit(f'{setup_py}: no python_requires=">=X.Y"')
    return match.group(1)


def pins(path: Path) -> list[tuple[str, str]]:
    """(name, version) of each `name==version` line of a constraints file, following its `-c FILE` lines."""
    out: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("-c "):
            out += pins(path.parent / line[3:].strip())
        elif match := PIN.match(line):
            out.append((match.group(1), match.group(2)))
    return out


def available(name: str, version: str, python: str, extra_index: list[str]) -> bool:
    """Whether pip would find `name==version` for Python `python` on this platform."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--python-version", python, "--pre"]
    for url in extra_index:
        cmd += ["--extra-index-url", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    listed = re.search(r"Available versions: (.*)", proc.stdout)
    return listed is not None and version in [v.strip() for v in listed.group(1).split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, default=[ROOT / "constraints.txt", ROOT / "constraints-cu12.txt"])
    p.add_argument("--python", default=None, help="X.Y to check (default: setup.py's floor)")
    p.add_argument("--extra-index-url", action="append", default=[], help="also ask this index (PyTorch's)")
    args = p.parse_args(argv)
    python = args.python or python_floor()
    todo = sorted({pin for f in args.files for pin in pins(f)})
    local = [pin for pin in todo if "+" in pin[1] and not args.extra_index_url]
    todo = [pin for pin in todo if pin not in local]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda pin: available(*pin, python, args.extra_index_url), todo))
    missing = [f"{n}=={v}" for (n, v), ok in zip(todo, found, strict=True) if not ok]
    print(f"Python {python}: {len(todo) - len(missing)} of {len(todo)} pins have a release for it")
    if local:
        print(f"not checked (PyTorch's index; --extra-index-url): {', '.join(f'{n}=={v}' for n, v in local)}")
    if missing:
        print(f"no release for Python {python}: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
