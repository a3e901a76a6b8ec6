"""Run a function on N real gloo ranks on loopback and collect what each returns.

`fn(rank, world_size, *args)` must be a module-level function (it is pickled into spawned processes). Each rank
joins a gloo group through `supcon_scale.distributed.init`, so the tests exercise the package's own set-up.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    from supcon_scale import distributed

    try:
        distributed.init(backend="gloo", seed=0, timeout_s=120)
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - the traceback is sent to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        distributed.teardown()


class _PortTaken(Exception):
    """Another process took the port between `free_port()` and rank 0 binding it."""


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, attempts: int = 3) -> list[Any]:
    """Results of `fn` on ranks 0..world_size-1; raises with the failing rank's traceback, never hangs.

    The port is picked free and then bound by rank 0's store a moment later; if something else took it in between
    (EADDRINUSE), the ranks are started again on a new port.
    """
    for attempt in range(attempts):
        try:
            return _run_ranks_once(fn, world_size, args, timeout)
        except _PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(fn: Callable, world_size: int, args: tuple, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                if "EADDRINUSE" in value or "address already in use" in value.lower():
                    raise _PortTaken(value)
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
