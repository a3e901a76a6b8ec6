"""CLI rows for the evaluation tests: run `supcon-scale ARGS` in-process, and find the one-line error naming the
culprit (no traceback)."""

from __future__ import annotations

from supcon_scale.cli import main


def run_cli(capsys, args: list[object]) -> tuple[int, str]:
    """(exit status, stderr + stdout) of `supcon-scale ARGS`."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def one_line_error(err: str, *names: str) -> str:
    """The one error line naming every one of `names`; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error" in line and all(n in line for n in names)]
    assert len(lines) == 1, f"not one error line naming {names} in:\n{err[-3000:]}"
    return lines[0]
