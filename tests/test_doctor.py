"""`supcon-scale doctor`: `--json`, and whether DeepSpeed's CPU op is compiled (issue 26 item 7, issue 28 item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

from supcon_scale import doctor

REPO = Path(__file__).resolve().parents[1]


def test_json_has_the_tables_rows_and_its_exit_status(capsys):
    code = doctor.main(["--json"])
    report = json.loads(capsys.readouterr().out)
    items = [r["item"] for r in report["rows"]]
    for item in ("NVIDIA driver", "torch", "GPUs", "DALI", "DeepSpeed", "DeepSpeed CPU op deepspeed_shm_comm"):
        assert item in items
    assert all(set(r) == {"item", "value", "verdict", "note"} for r in report["rows"])
    assert all(r["verdict"] in ("ok", "warn", "FAIL") for r in report["rows"])
    assert report["would_fail"] == [r["item"] for r in report["rows"] if r["verdict"] == "FAIL"]
    assert code == (1 if report["would_fail"] else 0)


def _sources() -> list[Path]:
    """DeepSpeed's own list of the op's sources (the reference for doctor.SHM_SOURCES)."""
    builder = ShareMemCommBuilder()
    return [Path(builder.deepspeed_src_path(s)).resolve() for s in builder.sources()]


def _fake_build(folder: Path, sources: list[Path]) -> Path:
    """What torch's JIT loader leaves behind: build.ninja naming the sources, and the library."""
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("".join(f"build {s.stem}.o: compile {s}\n" for s in sources))
    (folder / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    return folder / "deepspeed_shm_comm.so"


@pytest.mark.parametrize("case", ["missing", "built", "other install", "older than sources"])
def test_the_op_state_from_its_build_folder(tmp_path: Path, monkeypatch, case: str):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    if case != "missing":
        sources = _sources() if case != "other install" else [Path("/elsewhere") / s.name for s in _sources()]
        lib = _fake_build(folder, sources)
        if case == "older than sources":
            os.utime(lib, (0, 0))
    want = {"missing": "not built", "built": "built", "other install": "stale", "older than sources": "stale"}[case]
    state, where = doctor.shm_op_state()
    assert state == want, where
    assert doctor.shm_op_build_dir() == folder


def test_the_default_build_folder_is_torchs(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's user cache dir, away from the real one
    from torch.utils.cpp_extension import _get_build_directory

    assert doctor.shm_op_build_dir() == Path(_get_build_directory("deepspeed_shm_comm", verbose=False))


@pytest.mark.slow  # compiles the op: minutes on 2 cores
def test_build_ops_compiles_it_once_and_doctor_then_says_built(tmp_path: Path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "supcon_scale.cli", "doctor"]
    first = subprocess.run([*cmd, "--build-ops"], capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert first.returncode == 0 and "compiling" in first.stdout, first.stdout + first.stderr
    again = subprocess.run([*cmd, "--build-ops"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert again.returncode == 0 and "compiling" not in again.stdout, again.stdout
    report = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    row = next(r for r in json.loads(report.stdout)["rows"] if r["item"].startswith("DeepSpeed CPU op"))
    assert row["value"] == "built" and row["note"] == str(tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so")
