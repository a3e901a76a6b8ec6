"""Process-group set-up and the few collectives the rest of the package needs.

Only this module and `engines/` touch `torch.distributed`. Works under torchrun, the deepspeed launcher and SLURM
(srun) by reading their environment; without any of them it is a single process with no group.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from supcon_scale.devices import select_device


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


# The launcher's variables, read here and nowhere else (`launch_env`).
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# torchrun's agent sets these beside TORCHELASTIC_RUN_ID in every worker it starts.
AGENT_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "GROUP_RANK")
MAX_WORLD = 2**20
# How long the ranks wait for each other at start-up (torchrun's own rendezvous join timeout is 600 s).
RENDEZVOUS_TIMEOUT_S = 600.0
# The private folder `supcon-scale torchrun` gives its workers for their "checkpoint written" record
# (resilience.confirm_preemption); set by the agent itself, never by a launcher.
AGENT_DIR_VAR = "SUPCON_SCALE_AGENT_DIR"
# Config keys that only rank 0 acts on (its console): they may differ between ranks without changing any result.
PER_RANK_KEYS = ("train.progress", "log.plain")


@dataclass(frozen=True)
class Launch:
    """What the launcher said about this process, validated as a whole (`launch_env`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    source: str = "none"  # the variable that made this a multi-process job: WORLD_SIZE, SLURM_NTASKS or none
    run_id: str = ""  # TORCHELASTIC_RUN_ID
    restart_count: int = 0
    agent_store: bool = False  # TORCHELASTIC_USE_AGENT_STORE: the rendezvous store is torchrun's
    under_agent: bool = False  # every torchrun agent variable is set (not a stray TORCHELASTIC_RUN_ID)
    store: str = ":"  # MASTER_ADDR:MASTER_PORT as given (the lock's job identity; empty parts when unset)
    local_world_size: int = 1  # LOCAL_WORLD_SIZE: processes on this node (they share its CPUs)
    agent_dir: str = ""  # AGENT_DIR_VAR: set by `supcon-scale torchrun` for its workers


def _int_var(env: Mapping[str, str], name: str, lo: int, hi: int | None = None) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return value


def launch_env(env: Mapping[str, str] | None = None) -> Launch:
    """Rank, world size, local rank and rendezvous address from torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or from srun (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), all checked
    together: a partial set is an error naming what is missing, never a silent single-process or half-joined run."""
    env = os.environ if env is None else env
    has = {name for name in (*TORCHRUN_VARS, *SLURM_VARS, *AGENT_VARS) if env.get(name, "").strip()}
    agent = dict(
        run_id=env.get("TORCHELASTIC_RUN_ID", ""),
        restart_count=_int_var(env, "TORCHELASTIC_RESTART_COUNT", 0) if "TORCHELASTIC_RESTART_COUNT" in has else 0,
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        under_agent=set(AGENT_VARS) <= has,
        store=f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}",
        local_world_size=_int_var(env, "LOCAL_WORLD_SIZE", 1, MAX_WORLD) if env.get("LOCAL_WORLD_SIZE") else 1,
        agent_dir=env.get(AGENT_DIR_VAR, ""),
    )
    if has & {"RANK", "WORLD_SIZE"}:
        source, names = "WORLD_SIZE", ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in has and _int_var(env, "SLURM_NTASKS", 1) > 1:
        source, names = "SLURM_NTASKS", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        local = _int_var(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in has else 0  # deepspeed's --local_rank alone
        return Launch(local_rank=local, **agent)
    need = [n for n in names[:2] if n not in has]
    world = _int_var(env, names[1], 1, MAX_WORLD) if names[1] in has else 0
    if world > 1:
        need += [n for n in (names[2], "MASTER_ADDR", "MASTER_PORT") if n not in has]
    if need:
        given = ", ".join(f"{n}={env[n]}" for n in (*names, "MASTER_ADDR", "MASTER_PORT") if n in has)
        fix = (
            "run under srun (it sets SLURM_PROCID and SLURM_LOCALID) with MASTER_ADDR and MASTER_PORT exported, or "
            "unset SLURM_NTASKS for one process"
            if source == "SLURM_NTASKS"
            else "set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together (torchrun does), or unset "
            "them for one process"
        )
        raise ValueError(f"launcher environment incomplete: {given} but {', '.join(need)} not set; {fix}")
    rank = _int_var(env, names[0], 0, world - 1)
    local_rank = _int_var(env, names[2], 0, world - 1) if names[2] in has else 0
    port = _int_var(env, "MASTER_PORT", 1, 65535) if world > 1 else 0
    return Launch(rank, world, local_rank, env.get("MASTER_ADDR", ""), port, source, **agent)


def init(
    backend: str = "auto",
    seed: int = 0,
    timeout_s: float = 1800.0,
    device: str = "auto",
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
) -> Context:
    """Join the process group described by the launcher's environment and seed every RNG.

    `device` is the run config's `device` key (`select_device`). Model-init RNGs get the same `seed` on every rank
    (so replicas start equal); augmentation seeds derive from the global rank separately (see `rank_seed`).
    """
    launch = launch_env()
    world, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    where = select_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if where.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = rendezvous(launch, rendezvous_timeout_s)
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


def rendezvous(launch: Launch, timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> dist.Store:
    """The job's store, once every rank has reached it; a missing peer is a one-line error after `timeout_s`
    naming the address and the variable that made this process wait, never a silent half-hour hang."""
    waited = f"{launch.source}={launch.world_size}"
    wait = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            launch.world_size,
            is_master=launch.rank == 0 and not launch.agent_store,
            timeout=wait,
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as exc:  # DistStoreError/DistNetworkError: refused, in use, timed out
        raise ValueError(
            f"rendezvous at MASTER_ADDR:MASTER_PORT={launch.store} failed for rank {launch.rank} of {waited} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    # After an elastic restart the agent's store still holds the dead attempt's keys (gloo addresses among them):
    # a per-attempt prefix keeps attempts apart.
    store = dist.PrefixStore(f"supcon_scale/attempt_{launch.restart_count}/", store)
    if store.add("arrived", 1) == launch.world_size:
        store.set("all_arrived", "1")
    try:
        store.wait(["all_arrived"], wait)
    except (RuntimeError, OSError):
        raise ValueError(
            f"rendezvous at MASTER_ADDR:MASTER_PORT={launch.store}: {waited} but only "
            f"{store.add('arrived', 0)} rank(s) arrived within {timeout_s:.0f} s; start every rank, or unset "
            f"{launch.source} for one process"
        ) from None
    return store


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


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def agree_on_config(config: Mapping[str, Any], skip: tuple[str, ...] = PER_RANK_KEYS) -> None:
    """Collective, before any other of the run: every rank must have resolved the same config (keys in `skip`
    aside). A rank with another temperature or seed would train silently on other settings, and one with another
    loss name or batch would deadlock the first gather; a mismatch is a one-line ValueError on every rank naming
    the keys and the ranks. One all-gather of a digest; the configs themselves only when the digests differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = {k: v for k, v in flatten(config).items() if k not in skip}
    text = json.dumps(flat, sort_keys=True, default=str)
    digests = all_gather_object(hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    flats = all_gather_object(flat)
    keys = sorted({k for f in flats for k in f if len({json.dumps(g.get(k), default=str) for g in flats}) > 1})
    parts = []
    for k in keys[:5]:
        by_value: dict[str, list[int]] = {}
        for rank, f in enumerate(flats):
            by_value.setdefault(json.dumps(f.get(k), default=str), []).append(rank)
        parts.append(
            f"{k}: " + ", ".join(f"{v} on rank{'s' if len(r) > 1 else ''} {_ranks(r)}" for v, r in by_value.items())
        )
    more = f" (and {len(keys) - 5} more keys)" if len(keys) > 5 else ""
    raise ValueError(
        f"the ranks resolved different configs: {'; '.join(parts)}{more}; start every rank with the same config "
        "and overrides"
    )


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks[:8])) + (",..." if len(ranks) > 8 else "")


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
