"""Loss benchmark: median forward+backward time and peak memory per implementation, one fresh process per case.

`matmul` is the bare `Z @ Z.T` forward+backward measured in the same run (the speed baseline); `peer` is
pytorch-metric-learning's SupConLoss when installed. On the CPU each case runs in a fresh subprocess so its peak
RSS is its own; `baseline_bytes` is that process's peak once the inputs exist, before the loss runs.

`--queue K` adds, for every case, its twin with a labelled queue of K keys (`loss.queue_size`: K unit key rows
and K / 2 labels, made before the baseline like the inputs, since the queue is the run's state, not the loss's): the
loss over the M + K contrast set, and `matmul` over the same set (M x (M + K)).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("dense", "tiled", "matmul", "peer")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(impl: str, views: int, dim: int, device: str, repeats: int, classes: int = 1000, queue: int = 0) -> dict:
    """Time `repeats` forward+backward passes of one implementation on M = `views` embeddings (in this process),
    against `queue` queued keys besides the batch."""
    import torch

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(views // 2, 2, dim, generator=gen).to(dev)
    labels = torch.randint(0, classes, (views // 2,), generator=gen).to(dev)
    keys = torch.randn(queue, dim, generator=gen)
    keys = keys.div_(keys.norm(dim=1, keepdim=True)).to(dev)  # in place: no freed copy hides in the baseline peak
    key_labels = torch.randint(0, classes, (queue // 2,), generator=gen).to(dev)
    fn = _loss_fn(impl, keys, key_labels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _peak_rss_bytes()
    times = []
    for _ in range(repeats + 1):  # the first pass warms up (thread pools, allocator) and is not timed
        f = feats.requires_grad_(True)  # no copy: the inputs already count in the baseline
        f.grad = None
        start = time.perf_counter()
        fn(f, labels).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = times[1:]
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss_bytes()
    return {
        "impl": impl,
        "views": views,
        "dim": dim,
        "device": device,
        "seconds": statistics.median(times),
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "repeats": repeats,
        "queue": queue,
    }


def _loss_fn(impl: str, keys, key_labels):
    import torch

    if impl == "matmul":

        def bare(f, labels):
            z = f.reshape(-1, f.shape[-1])
            return (z @ (torch.cat([z, keys]) if keys.shape[0] else z).T).sum()

        return bare
    if impl == "peer":
        if keys.shape[0]:
            raise SystemExit("impl peer has no queue (pytorch-metric-learning's SupConLoss)")
        try:
            from pytorch_metric_learning.losses import SupConLoss as PeerLoss
        except ImportError:
            raise SystemExit("impl peer needs pytorch-metric-learning (pip install supcon_scale[dev])") from None
        peer = PeerLoss(temperature=0.1)

        def run_peer(f, labels):
            return peer(torch.nn.functional.normalize(f.reshape(-1, f.shape[-1]), dim=1), labels.repeat_interleave(2))

        return run_peer
    from supcon_scale.losses import SupConLoss

    loss = SupConLoss(temperature=0.1, impl=impl, gather=False)
    return (lambda f, labels: loss(f, labels, keys, key_labels)) if keys.shape[0] else loss


def _parse_list(text: str, cast, name: str) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected a comma-separated list, got {text!r}") from None


def _run_subprocess(impl: str, views: int, dim: int, device: str, repeats: int, timeout: float, queue: int = 0) -> dict:
    case = f"{impl},{views},{dim},{device},{repeats},{queue}"
    cmd = [sys.executable, "-m", "supcon_scale.bench.loss", "--case", case]
    row = {
        "impl": impl,
        "views": views,
        "dim": dim,
        "device": device,
        "seconds": None,
        "peak_bytes": None,
        "baseline_bytes": None,
        "repeats": repeats,
        "queue": queue,
    }
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {**row, "error": f"exit {proc.returncode}: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_loss", description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="4096,12288", help="comma-separated M = batch x views (default 4096,12288)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--impls", default="dense,tiled,matmul", help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is reported failed")
    parser.add_argument("--json", dest="json_path", help="write the rows as JSON here")
    parser.add_argument("--queue", type=int, default=0, help="also each case with a labelled queue of K keys")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    args = parser.parse_args(argv)
    if args.case:
        impl, views, dim, device, repeats, queue = args.case.split(",")
        print(json.dumps(run_case(impl, int(views), int(dim), device, int(repeats), queue=int(queue))))
        return 0
    views = _parse_list(args.views, int, "views")
    impls = _parse_list(args.impls, str, "impls")
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        parser.error(f"--impls: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(IMPLS)}")
    if any(m < 2 or m % 2 for m in views):
        parser.error("--views: every M must be an even number >= 2 (two views per image)")
    if args.repeats < 1 or args.dim < 1:
        parser.error("--repeats and --dim must be >= 1")
    if args.queue < 0 or args.queue % 2:
        parser.error("--queue: K must be an even number >= 0 (two views per queued image)")
    if args.queue and "peer" in impls:
        parser.error("--queue: impl peer has no queue")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    rows: list[dict] = []
    for m in views:
        for impl in impls:
            for k in (0, args.queue) if args.queue else (0,):
                rows.append(_run_subprocess(impl, m, args.dim, args.device, args.repeats, args.timeout, k))
            if args.json_path:  # after every case: a later failure (or a killed run) keeps the finished figures
                Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
    _print_table(rows, _machine(args.device))
    return 0


def _machine(device: str) -> str:
    import os

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _print_table(rows: list[dict], machine: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SupCon loss forward+backward ({machine})")
    for col in ("impl", "M", "K", "D", "median s", "x matmul", "peak above baseline", "above plain"):
        table.add_column(col, justify="left" if col == "impl" else "right")

    def case(r: dict) -> tuple:
        return r["views"], r.get("queue", 0), r["dim"]

    bare = {case(r): r["seconds"] for r in rows if r["impl"] == "matmul" and r["seconds"]}
    above = {(r["impl"], *case(r)): r["peak_bytes"] - r["baseline_bytes"] for r in rows if r["seconds"] is not None}
    for r in rows:
        names = (r["impl"], str(r["views"]), str(r.get("queue", 0)), str(r["dim"]))
        if r["seconds"] is None:
            table.add_row(*names, r.get("error", "failed"), "", "", "")
            continue
        ref = bare.get(case(r))
        plain = above.get((r["impl"], r["views"], 0, r["dim"])) if r.get("queue") else None
        mine = above[(r["impl"], *case(r))]
        table.add_row(
            *names,
            f"{r['seconds']:.3f}",
            f"{r['seconds'] / ref:.2f}" if ref else "-",
            f"{mine / 2**20:,.1f} MiB",
            "-" if plain is None else f"{(mine - plain) / 2**20:+,.1f} MiB",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
