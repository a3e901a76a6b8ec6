"""Process-group set-up and the few collectives the rest of the package needs.

Only this module and `engines/` touch `torch.distributed`. Works under torchrun, the deepspeed launcher and SLURM
(srun) by reading their environment; without any of them it is a single process with no group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job. `rank` is the global rank: seeds and data shards derive from it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


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


def _gpus_promised() -> bool:
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
    if device == "cuda" or _gpus_promised():
        raise ValueError(
            f"device={device}: CUDA is not usable ({problem}): {cuda_report()}; "
            "fix the driver or the GPU allocation, or set device=cpu to train on the CPU"
        )
    return torch.device("cpu")


def init(backend: str = "auto", seed: int = 0, timeout_s: float = 1800.0, device: str = "auto") -> Context:
    """Join the process group described by the launcher's environment and seed every RNG.

    `device` is the run config's `device` key (`select_device`). Model-init RNGs get the same `seed` on every rank
    (so replicas start equal); augmentation seeds derive from the global rank separately (see `rank_seed`).
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    where = select_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if where.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After an elastic restart the agent's store still holds the dead attempt's gloo addresses: a fresh
            # rank could read them and fail "Connection refused". A per-attempt prefix keeps attempts apart.
            client = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
            )
            store = dist.PrefixStore(f"supcon_scale/attempt_{restart}/", client)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=where if where.type == "cuda" else None,
        )
    seed_everything(seed)
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=where)


def single_process_group(device: torch.device) -> None:
    """A one-rank process group held in memory, for a library that insists on a group (DeepSpeed) when the job is
    a plain `python` run with no launcher and so no RANK/MASTER_ADDR environment to rendezvous through."""
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1, device_id=device if cuda else None
        )


@contextlib.contextmanager
def temporary_single_process_group(device: torch.device) -> Iterator[None]:
    """`single_process_group` for the duration of a block; a group that existed before is left as it was."""
    created = not dist.is_initialized()
    single_process_group(device)
    try:
        yield
    finally:
        if created:
            teardown()


def teardown() -> None:
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A per-rank seed from the *global* rank (solo-learn's local-rank seeds collided across nodes)."""
    return int(np.random.SeedSequence([seed, rank, *salt]).generate_state(1)[0])


def world() -> tuple[int, int]:
    """(rank, world_size) of the current default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_host_group: tuple[object, dist.ProcessGroup] | None = None  # (the default group, its gloo twin)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: a CPU all-reduce (gloo, beside an NCCL group), so agreeing on a
    host-side flag (a preemption signal) never waits for the GPU's queued work. Collective."""
    global _host_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    group = None
    if dist.get_backend() != "gloo":
        # Made once per default group (every rank gets here at the same step: new_group is a collective).
        if _host_group is None or _host_group[0] is not dist.group.WORLD:
            _host_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
        group = _host_group[1]
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(value: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """A reduced copy of `value` (no gradient); the input itself without a group."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (for logging)."""
    return _all_reduce(value, dist.ReduceOp.SUM) / (dist.get_world_size() if dist.is_initialized() else 1)


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.MIN)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.SUM)


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (one small all-gather and one host read), to detect uneven batches before a
    collective hangs."""
    if not dist.is_initialized():
        return [n]
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out).tolist()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over ranks and returns this rank's slice.

    The sum matters: every rank's loss depends on every rank's embeddings, so the gradient of embedding k is the sum
    of all ranks' contributions (lightly's GatherLayer returned only its own slice, lightly #1528).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.sizes = sizes
        ctx.rank = rank
        x = x.contiguous()  # pytorch #120386: non-contiguous buffers gave wrong gathers
        biggest = max(sizes)
        if x.shape[0] < biggest:  # uneven local batches: pad, gather, trim
            pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
            x = torch.cat([x, pad])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate `x` ([n, ...], n may differ by rank) from all ranks with gradients flowing back to the owners.

    Returns the gathered tensor and the offset of this rank's rows in it. Without a group it returns `(x, 0)`.
    `sizes` (every rank's n, when the caller knows them) saves the size exchange and its host read.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    sizes = sizes if sizes is not None else local_sizes(x.shape[0], x.device)
    gathered = _GatherWithGrad.apply(x, sizes)
    return gathered, sum(sizes[: dist.get_rank()])


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's output feeds its own loss, so the input's gradient is the sum of theirs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum); the input itself without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


def cuda_sync_batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of `x` with statistics over all ranks, through torch's fused CUDA kernels."""
    from torch.nn.modules._functions import SyncBatchNorm as _SyncBatchNormFn

    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return _SyncBatchNormFn.apply(
        x,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        momentum,
        dist.group.WORLD,
        dist.get_world_size(),
    )


def all_gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Gather without gradient (labels, label vectors); uneven sizes allowed (`sizes`: as in all_gather_with_grad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    with torch.no_grad():
        sizes = sizes if sizes is not None else local_sizes(x.shape[0], x.device)
        biggest = max(sizes)
        x = x.contiguous()
        if x.shape[0] < biggest:
            x = torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def record(fn):
    """torchrun's error recorder: a worker's traceback reaches the launcher's summary.

    (torch.distributed.elastic.multiprocessing.errors.record)
    """
    from torch.distributed.elastic.multiprocessing.errors import record as _record

    return _record(fn)
