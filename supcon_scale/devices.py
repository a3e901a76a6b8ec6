"""Which device this process trains on: CUDA's health, the NVIDIA driver, the launcher's GPU for this rank.

Read before any process group exists (`distributed.init` calls `select_device`), and by `doctor` and the GPU
check without one; nothing here touches `torch.distributed`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import torch

# CUDA 13 needs an R580 driver or newer (NVIDIA's CUDA Toolkit release notes, "CUDA Driver" table; README "GPUs").
MIN_DRIVER = {13: "580", 12: "525"}


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version without initialising CUDA (it may be the broken part), or None."""
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for [^ ]+)?\s+([0-9.]+)", text)
        if match:
            return match.group(1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return None


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process (torch's own first line), or None when it can."""
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError/AssertionError depending on how CUDA is missing
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "torch.cuda.is_available() is False"


def cuda_report() -> str:
    """Driver, torch's CUDA and CUDA_VISIBLE_DEVICES in one line: what an engineer checks first."""
    major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    need = f" (needs >= R{MIN_DRIVER[major]})" if major in MIN_DRIVER else ""
    return (
        f"driver {driver_version() or 'not found'}{need}, torch {torch.__version__} built for CUDA "
        f"{torch.version.cuda or 'none (a CPU-only build)'}, CUDA_VISIBLE_DEVICES="
        f"{_quoted_env('CUDA_VISIBLE_DEVICES')}"
    )


def _quoted_env(name: str) -> str:
    value = os.environ.get(name)
    return "<unset>" if value is None else shlex.quote(value)


def gpus_promised() -> bool:
    """The launcher or the user made GPUs visible to this process (CUDA_VISIBLE_DEVICES names one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() not in ("", "-1", "none", "NoDevFiles")


def cuda_index(local_rank: int, device_count: int) -> int:
    """This process's CUDA device: its local rank, or 0 when the launcher gave each task one GPU of its own.

    Slurm with `--gpus-per-task=1` (or `--gpu-bind=single:1`) sets CUDA_VISIBLE_DEVICES per task, so every task sees
    one device 0 while SLURM_LOCALID runs 0..n-1.
    """
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise ValueError(
            f"device=cuda: local rank {local_rank} but this process sees {device_count} GPUs ({cuda_report()}); "
            "launch at most one process per visible GPU"
        )
    return local_rank


def select_device(device: str, local_rank: int) -> torch.device:
    """`device: auto | cuda | cpu`. auto is cuda when CUDA works and cpu when no GPU was made visible; a requested
    or promised GPU that CUDA cannot use is an error, never a silent CPU run."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device: {device!r} is not one of auto, cuda, cpu")
    if device == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    if device == "cuda" or gpus_promised():
        raise ValueError(
            f"device={device}: CUDA is not usable ({problem}): {cuda_report()}; "
            "fix the driver or the GPU allocation, or set device=cpu to train on the CPU"
        )
    return torch.device("cpu")
