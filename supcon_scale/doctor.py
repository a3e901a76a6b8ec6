"""`supcon-scale doctor`: what this node would run with, and what would fail, before a job is queued on it.

One table: the NVIDIA driver against the minimum for torch's CUDA major, torch and its CUDA build, NCCL, the GPUs,
DALI (and whether its CUDA major matches torch's), DeepSpeed (the accelerator it would pick, and whether its CPU
communication op is compiled), the CPUs this process may use, and the launcher's variables. A row that would make a
`device=cuda` run fail says so; the exit status is 1 when any does. `--json` prints the rows as JSON; `--build-ops`
compiles DeepSpeed's CPU op once (`make` runs it before the tests), so no run or test compiles it on first use.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

OK, WARN, FAIL = "ok", "warn", "FAIL"


class Row(NamedTuple):
    item: str
    value: str
    verdict: str  # ok | warn | FAIL
    note: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder: the CPU accelerator's collectives (deepspeed.comm)
SHM_SOURCES = ("shm_interface.cpp", "shm.cpp")  # ShareMemCommBuilder.sources(), under deepspeed/ops/csrc/cpu/comm


def shm_op_build_dir() -> Path:
    """Where torch's JIT loader builds the op: TORCH_EXTENSIONS_DIR, or ~/.cache/torch_extensions/py311_cu130.

    The naming of torch.utils.cpp_extension._get_build_directory, rebuilt here because that private function
    creates the folder, and a check must not write anything.
    """
    import torch

    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on a CPU node: not a finding here
    try:
        from torch.utils.cpp_extension import get_default_build_root
    finally:
        quiet.setLevel(level)

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        if torch.version.hip is not None:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{accel}")
    return Path(root) / SHM_OP


def shm_op_state() -> tuple[str, str]:
    """("built" | "not built" | "stale", where or why) for DeepSpeed's CPU op, without importing DeepSpeed.

    Built means: the library exists, its build.ninja names this DeepSpeed install's sources (a venv moved or a
    DeepSpeed upgrade makes torch rebuild it) and no source is newer than it.
    """
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return "not built", "DeepSpeed is not installed"
    sources = [Path(spec.origin).parent / "ops" / "csrc" / "cpu" / "comm" / name for name in SHM_SOURCES]
    folder = shm_op_build_dir()
    lib, ninja = folder / f"{SHM_OP}.so", folder / "build.ninja"
    if not lib.is_file() or not ninja.is_file():
        return "not built", f"no {lib}"
    text = ninja.read_text(errors="replace")
    if not all(str(src) in text for src in sources):
        return "stale", f"{folder} was built from another DeepSpeed install"
    if any(src.is_file() and src.stat().st_mtime > lib.stat().st_mtime for src in sources):
        return "stale", f"{lib} is older than its sources"
    return "built", str(lib)


def build_shm_op() -> int:
    """Compile DeepSpeed's CPU op now (minutes on 2 cores the first time; a no-op when built), as a run would."""
    if importlib.util.find_spec("deepspeed") is None:
        print("supcon-scale doctor: DeepSpeed is not installed: no op to build")
        return 0
    state, _ = shm_op_state()
    if state != "built":
        print(f"supcon-scale doctor: compiling DeepSpeed's {SHM_OP} ({state}; minutes on a small CPU)", flush=True)
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if not builder.is_compatible(verbose=False):
        print(f"supcon-scale doctor: {SHM_OP} cannot be built here: DeepSpeed falls back to gloo's collectives")
        return 0
    builder.load(verbose=False)
    state, where = shm_op_state()
    print(f"supcon-scale doctor: {SHM_OP} {state} ({where})")
    return 0


def _deepspeed_rows(cuda_works: bool) -> list[Row]:
    """DeepSpeed's version and accelerator, and whether its CPU op is compiled."""
    ds = _version("deepspeed")
    if ds is None:
        return [Row("DeepSpeed", "not installed", WARN, "engine.name=deepspeed needs supcon_scale[deepspeed]")]
    want = "cuda" if cuda_works else "cpu"
    chosen = os.environ.get("DS_ACCELERATOR")
    bad = chosen is not None and chosen != want
    note = f"DS_ACCELERATOR={chosen} but the device is {want}" if bad else f"accelerator {want}"
    state, where = shm_op_state()
    if state != "built":
        where += ": the first DS_ACCELERATOR=cpu run compiles it (minutes); supcon-scale doctor --build-ops does it now"
    return [
        Row("DeepSpeed", ds, FAIL if bad else OK, note),
        Row(f"DeepSpeed CPU op {SHM_OP}", state, OK if state == "built" else WARN, where),
    ]


def rows() -> list[Row]:
    """Every check, in the order an engineer reads them."""
    import torch

    cuda_major = _major(torch.version.cuda) if torch.version.cuda else None
    out, driver = _driver_rows(cuda_major)
    gpus, problem = _gpu_rows(driver)
    out += gpus
    out.append(_dali_row(cuda_major))
    out += _deepspeed_rows(cuda_works=problem is None)
    return out + _host_rows()


def _driver_rows(cuda_major: int | None) -> tuple[list[Row], str | None]:
    """The NVIDIA driver against torch's CUDA major, and torch's build; the driver's version (None: not found)."""
    import torch

    from supcon_scale import devices

    out: list[Row] = []
    need = devices.MIN_DRIVER.get(cuda_major) if cuda_major else None
    driver = devices.driver_version()
    if driver is None:
        out.append(Row("NVIDIA driver", "not found", WARN, "no GPU here: device=cuda fails, device=auto trains on CPU"))
    elif need and _major(driver) is not None and _major(driver) < int(need):
        out.append(Row("NVIDIA driver", driver, FAIL, f"CUDA {cuda_major} needs R{need}+ (README, GPUs)"))
    else:
        out.append(Row("NVIDIA driver", driver, OK, f"R{need}+ needed" if need else ""))
    out.append(
        Row(
            "torch",
            f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
            OK if torch.version.cuda else WARN,
            "" if torch.version.cuda else "a CPU-only build",
        )
    )
    return out, driver


def _gpu_rows(driver: str | None) -> tuple[list[Row], str | None]:
    """The GPUs CUDA can use and NCCL, or why none; why CUDA is unusable (None: it works)."""
    import torch

    from supcon_scale import devices

    problem = devices.cuda_problem()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if problem is not None:
        verdict = FAIL if devices.gpus_promised() or driver else WARN
        return [Row("GPUs", "none usable", verdict, f"{problem} (CUDA_VISIBLE_DEVICES={visible})")], problem
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    out = [Row("GPUs", f"{torch.cuda.device_count()} x {', '.join(names)}", OK, f"CUDA_VISIBLE_DEVICES={visible}")]
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        out.append(Row("NCCL", nccl, OK))
    except Exception as exc:  # noqa: BLE001 - a broken NCCL is the finding
        out.append(Row("NCCL", "unusable", FAIL, str(exc).splitlines()[0]))
    return out, None


def _dali_row(cuda_major: int | None) -> Row:
    """DALI's wheel and whether its CUDA major is torch's."""
    dali = next(((d, v) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120") if (v := _version(d))), None)
    if dali is None:
        return Row("DALI", "not installed", WARN, "data.backend=dali* needs pip install supcon_scale[dali]")
    dali_major = 13 if dali[0].endswith("130") else 12
    match = cuda_major in (None, dali_major)
    return Row(
        "DALI",
        f"{dali[1]} ({dali[0]})",
        OK if match else FAIL,
        "" if match else f"built for CUDA {dali_major}, torch for CUDA {cuda_major}: one major",
    )


def _host_rows() -> list[Row]:
    """The CPUs each rank on this node may use, and the launcher's variables."""
    cpus = len(os.sched_getaffinity(0))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0] or 1)
    per_rank = cpus // max(ranks, 1)
    out = [
        Row(
            "CPU affinity",
            f"{cpus} of {os.cpu_count()} CPUs",
            WARN if per_rank < 4 else OK,
            f"{per_rank} per rank for loader workers / DALI threads"
            + (" (srun without --cpus-per-task?)" if per_rank < 4 and "SLURM_JOB_ID" in os.environ else ""),
        )
    ]
    launcher = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID") if n in os.environ]
    out.append(Row("launcher", ", ".join(f"{n}={os.environ[n]}" for n in launcher) or "none (one process)", OK))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supcon-scale doctor", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="the rows as JSON: {rows: [{item, value, verdict, note}], ...}")
    p.add_argument(
        "--build-ops", action="store_true", help=f"compile DeepSpeed's CPU op {SHM_OP} now (make does, once)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.build_ops:
        return build_shm_op()
    found = rows()
    failing = [r.item for r in found if r.verdict == FAIL]
    if args.json:
        print(json.dumps({"rows": [r._asdict() for r in found], "would_fail": failing}, indent=1))
        return 1 if failing else 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="supcon-scale doctor")
    for col in ("check", "value", "", "note"):
        table.add_column(col)
    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    for r in found:
        table.add_row(r.item, r.value, f"[{colour[r.verdict]}]{r.verdict}[/]", r.note)
    Console(width=160).print(table)
    if failing:
        print(f"supcon-scale doctor: would fail: {', '.join(failing)}", file=sys.stderr)
    return 1 if failing else 0
