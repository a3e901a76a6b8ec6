"""Fast commands (issue 26 item 3): `--help` and refused commands answer before torch, timm or DALI is imported.

Each case runs in a fresh interpreter and reads `sys.modules` after `cli.main(...)` returns (or exits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supcon_scale import cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "nvidia.dali")

# The commands whose `--help` still imports torch first: their argument parsers live in modules that import torch at
# the top, directly or through data/__init__.py, console.py or distributed.py (docs/BENCHMARKS.md, "Start-up of a
# command"); torchrun's options are torch's own parser. Every other command must stay light: a new command is
# classified here, or the completeness test fails.
IMPORTS_TORCH_FOR_HELP = {
    "check-data", "make-shards", "linear-eval", "finetune", "knn", "imagenet-c", "demo", "continual", "torchrun",
    "bench-dataloader", "bench-train", "plot", "embed-plot",
}  # fmt: skip


def _subcommands() -> list[str]:
    (sub,) = cli.parser()._subparsers._group_actions  # argparse keeps the subcommands' table there
    return sorted(sub.choices)


LIGHT = sorted(set(_subcommands()) - IMPORTS_TORCH_FOR_HELP)


def _run(argv: list[str], cwd: Path) -> dict:
    """cli.main(argv) in a fresh interpreter: its exit status, stdout/stderr, and which heavy packages it imported."""
    code = f"""
import json, sys
from supcon_scale import cli
try:
    rc = cli.main({argv!r})
except SystemExit as exc:
    rc = exc.code
print(json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    *lines, last = proc.stderr.strip().splitlines()
    return {**json.loads(last), "out": proc.stdout, "err": "\n".join(lines)}


def test_every_subcommand_is_classified():
    assert IMPORTS_TORCH_FOR_HELP < set(_subcommands())
    assert {"train", "config", "inspect", "recipes", "make-demo-data", "doctor"} <= set(LIGHT)


@pytest.mark.parametrize("command", [[], *([c] for c in LIGHT), ["config", "show"]], ids=lambda c: " ".join(c))
def test_help_imports_no_torch(command: list[str], tmp_path: Path):
    got = _run([*command, "--help"], tmp_path)
    assert got["rc"] == 0 and "usage:" in got["out"], got
    assert got["heavy"] == [], f"{command} --help imported {got['heavy']}"


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["train", "--config", "missing.yaml"], "missing.yaml"),
        (["train", "--config", "demo/digits", "data.no_such_key=1"], "data.no_such_key"),
        (["train", "--config", "demo/digits", "data.global_batch_size=-4"], "data.global_batch_size"),
        (["train", "--no-such-flag"], "--no-such-flag"),
        (["config", "show", "--config", "demo/digits", "loss.temprature=0.1"], "loss.temprature"),
        (["inspect", "no_such_run"], "no_such_run"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_a_refused_command_imports_no_torch(argv: list[str], culprit: str, tmp_path: Path):
    got = _run(argv, tmp_path)
    assert got["rc"] == cli.EXIT_USAGE, got
    assert culprit in got["err"], got["err"]
    assert got["heavy"] == [], f"{argv} imported {got['heavy']}"
