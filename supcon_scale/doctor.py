"""`supcon-scale doctor`: what this node would run with, and what would fail, before a job is queued on it.

One table: the NVIDIA driver against the minimum for torch's CUDA major, torch and its CUDA build, NCCL, the GPUs,
DALI (and whether its CUDA major matches torch's), DeepSpeed (and the accelerator it would pick), the CPUs this
process may use, and the launcher's variables. A row that would make a `device=cuda` run fail says so; the exit
status is 1 when any does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
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


def rows() -> list[Row]:
    """Every check, in the order an engineer reads them."""
    import torch

    from supcon_scale import distributed

    out: list[Row] = []
    cuda_major = _major(torch.version.cuda) if torch.version.cuda else None
    need = distributed.MIN_DRIVER.get(cuda_major) if cuda_major else None
    driver = distributed.driver_version()
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
    problem = distributed.cuda_problem()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if problem is None:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        out.append(
            Row("GPUs", f"{torch.cuda.device_count()} x {', '.join(names)}", OK, f"CUDA_VISIBLE_DEVICES={visible}")
        )
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
            out.append(Row("NCCL", nccl, OK))
        except Exception as exc:  # noqa: BLE001 - a broken NCCL is the finding
            out.append(Row("NCCL", "unusable", FAIL, str(exc).splitlines()[0]))
    else:
        promised = distributed._gpus_promised()
        out.append(
            Row(
                "GPUs",
                "none usable",
                FAIL if promised or driver else WARN,
                f"{problem} (CUDA_VISIBLE_DEVICES={visible})",
            )
        )
    dali = next(((d, v) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120") if (v := _version(d))), None)
    if dali is None:
        out.append(Row("DALI", "not installed", WARN, "data.backend=dali* needs pip install supcon_scale[dali]"))
    else:
        dali_major = 13 if dali[0].endswith("130") else 12
        match = cuda_major in (None, dali_major)
        out.append(
            Row(
                "DALI",
                f"{dali[1]} ({dali[0]})",
                OK if match else FAIL,
                "" if match else f"built for CUDA {dali_major}, torch for CUDA {cuda_major}: one major",
            )
        )
    ds = _version("deepspeed")
    if ds is None:
        out.append(Row("DeepSpeed", "not installed", WARN, "engine.name=deepspeed needs supcon_scale[deepspeed]"))
    else:
        want = "cuda" if problem is None else "cpu"
        chosen = os.environ.get("DS_ACCELERATOR")
        bad = chosen is not None and chosen != want
        out.append(
            Row(
                "DeepSpeed",
                ds,
                FAIL if bad else OK,
                f"DS_ACCELERATOR={chosen} but the device is {want}" if bad else f"accelerator {want}",
            )
        )
    cpus = len(os.sched_getaffinity(0))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0] or 1)
    per_rank = cpus // max(ranks, 1)
    out.append(
        Row(
            "CPU affinity",
            f"{cpus} of {os.cpu_count()} CPUs",
            WARN if per_rank < 4 else OK,
            f"{per_rank} per rank for loader workers / DALI threads"
            + (" (srun without --cpus-per-task?)" if per_rank < 4 and "SLURM_JOB_ID" in os.environ else ""),
        )
    )
    launcher = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID") if n in os.environ]
    out.append(Row("launcher", ", ".join(f"{n}={os.environ[n]}" for n in launcher) or "none (one process)", OK))
    return out


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="supcon-scale doctor", description=__doc__.splitlines()[0]).parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="supcon-scale doctor")
    for col in ("check", "value", "", "note"):
        table.add_column(col)
    found = rows()
    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    for r in found:
        table.add_row(r.item, r.value, f"[{colour[r.verdict]}]{r.verdict}[/]", r.note)
    Console(width=160).print(table)
    failing = [r.item for r in found if r.verdict == FAIL]
    if failing:
        print(f"supcon-scale doctor: would fail: {', '.join(failing)}", file=sys.stderr)
    return 1 if failing else 0
