"""Fast commands (issue 26 item 3): `--help` and refused commands answer before torch, timm or DALI is imported.

Each case runs in a fresh interpreter and reads `sys.modules` after `cli.main(...)` returns (or exits); the delegated
commands are covered from cli.DELEGATED, so a new one is checked without being named here."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from supcon_scale import arguments, cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "nvidia.dali")

# The one command whose `--help` imports torch: `supcon-scale torchrun` passes its arguments to torch's own torchrun
# parser (torch.distributed.run), which prints torchrun's options; rebuilding that parser here would copy torch's
# flags and drift with every torch release. Every other command must stay light: a new command is light, or named
# here with its reason.
IMPORTS_TORCH_FOR_HELP = {"torchrun"}


def _subcommands() -> list[str]:
    (sub,) = cli.parser()._subparsers._group_actions  # argparse keeps the subcommands' table there
    return sorted(sub.choices)


LIGHT = sorted(set(_subcommands()) - IMPORTS_TORCH_FOR_HELP - set(cli.DELEGATED))
DELEGATED_LIGHT = sorted(set(cli.DELEGATED) - IMPORTS_TORCH_FOR_HELP)
MARK = "@@"  # starts the line of each call's record on stdout


def _run_all(argvs: list[list[str]], cwd: Path) -> list[dict]:
    """cli.main(argv) for each argv in turn in one fresh interpreter: after each, its exit status, its stdout and
    stderr, and which heavy packages the interpreter has imported so far."""
    code = f"""
import contextlib, io, json, sys
from supcon_scale import arguments, cli
for argv in {argvs!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    print({MARK!r} + json.dumps({{"rc": rc, "heavy": heavy, "out": out.getvalue(), "err": err.getvalue()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    runs = [json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert len(runs) == len(argvs), proc.stderr  # the interpreter died before the end
    return runs


def _run(argv: list[str], cwd: Path) -> dict:
    """cli.main(argv) in a fresh interpreter: its exit status, stdout/stderr, and which heavy packages it imported."""
    return _run_all([argv], cwd)[0]


def _refuses_no_arguments(command: str) -> bool:
    """Whether the command's parser has a required argument (then `supcon-scale COMMAND` alone is refused)."""
    parser = arguments.PARSERS.get(command)
    if parser is None:
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser().parse_args([])
    except SystemExit:
        return True
    return False


def test_every_subcommand_is_classified():
    assert IMPORTS_TORCH_FOR_HELP < set(_subcommands())
    assert {"train", "config", "inspect", "recipes", "make-demo-data"} <= set(LIGHT)
    assert {"knn", "linear-eval", "continual", "doctor"} <= set(DELEGATED_LIGHT)
    assert set(arguments.PARSERS) <= set(cli.DELEGATED)


@pytest.mark.parametrize("command", [[], *([c] for c in LIGHT), ["config", "show"]], ids=lambda c: " ".join(c))
def test_help_imports_no_torch(command: list[str], tmp_path: Path):
    got = _run([*command, "--help"], tmp_path)
    assert got["rc"] == 0 and "usage:" in got["out"], got
    assert got["heavy"] == [], f"{command} --help imported {got['heavy']}"


@pytest.mark.parametrize("command", DELEGATED_LIGHT)
def test_a_delegated_command_parses_before_its_module_imports(command: str, tmp_path: Path):
    """`--help`, an unknown flag and (where one is required) a missing argument answer before torch, timm or DALI."""
    cases = [[command, "--help"], [command, "--no-such-flag"]]
    if _refuses_no_arguments(command):
        cases.append([command])
    runs = _run_all(cases, tmp_path)
    for argv, got in zip(cases, runs, strict=True):
        assert got["heavy"] == [], f"{argv} imported {got['heavy']}"
    (help_, unknown, *missing) = runs
    assert help_["rc"] == 0 and "usage:" in help_["out"], help_
    # argparse names a missing required argument before an unrecognised one
    assert unknown["rc"] == cli.EXIT_USAGE and ("--no-such-flag" in unknown["err"] or missing), unknown
    for got in missing:
        assert got["rc"] == cli.EXIT_USAGE and "required" in got["err"], got


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
