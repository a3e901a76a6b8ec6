"""Training-step benchmark: a SupCon step vs a cross-entropy step of the same encoder, synthetic data, one process.

The cross-entropy step is the baseline measured in the same run: SupCon's target is >= 95% of its per-view rate.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from supcon_scale import config, engines, losses, models
from supcon_scale.distributed import Context


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide peak RSS (Linux: KiB)


def measure(cfg: config.RunConfig, ctx: Context, batch: int, steps: int, warmup: int, loss_name: str) -> dict[str, Any]:
    """Images/s and views/s of full training steps (forward, loss, backward, optimizer) on synthetic data."""
    views = cfg.data.views if loss_name != "cross_entropy" else 1
    torch.manual_seed(0)
    model = models.build(cfg.model, num_classes=1000 if loss_name == "cross_entropy" else None)
    engine = engines.build(cfg, ctx, model, total_steps=steps + warmup, warmup_steps=0)
    engine.train()
    criterion = torch.nn.CrossEntropyLoss() if loss_name == "cross_entropy" else losses.build(cfg.loss)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    size = cfg.data.image_size
    x = torch.randn(views * batch, 3, size, size, device=ctx.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    def one_step() -> None:
        with engine.autocast():
            out = engine(x)
        if loss_name == "cross_entropy":
            loss = criterion(out.float(), y)
        else:
            loss = criterion(out.float().reshape(views, batch, -1).transpose(0, 1), y)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        one_step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    return {
        "loss": loss_name, "batch_per_gpu": batch, "views": views, "step_s": seconds / steps,
        "images_per_s": batch * steps / seconds, "views_per_s": views * batch * steps / seconds,
        "peak_memory_bytes": _peak_bytes(ctx.device),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__)
    p.add_argument("--model", default="resnet50", help="timm encoder name")
    p.add_argument("--batch-per-gpu", type=int, default=64, help="images per step (SupCon trains V views of each)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch_per_gpu < 2 or args.steps < 1:
        print("bench_train: --batch-per-gpu must be >= 2 and --steps >= 1", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    ctx = Context(device=device)
    overrides = [
        f"model.encoder={args.model}", f"precision={args.precision}", f"data.image_size={args.image_size}",
        f"data.global_batch_size={args.batch_per_gpu}", f"model.channels_last={not args.no_channels_last}",
        "loss.name=supcon",
    ]
    try:
        cfg = config.load(None, overrides)
    except ValueError as exc:
        print(f"bench_train: {exc}", file=sys.stderr)
        return 2
    # cross-entropy first: on the CPU the peak RSS is process-wide, so SupCon's figure includes CE's
    results = [measure(cfg, ctx, args.batch_per_gpu, args.steps, args.warmup, name)
               for name in ("cross_entropy", "supcon")]
    ratio = results[1]["views_per_s"] / results[0]["views_per_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {"device": device_name, "model": args.model, "precision": args.precision, "image_size": args.image_size,
              "results": results,
              "supcon_vs_ce_views_ratio": ratio, "torch": torch.__version__}
    _print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step: {report['model']} {report['precision']} {report['image_size']}px on {report['device']}")
    for col in ("loss", "batch", "views/s", "images/s", "step ms", "peak MiB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(r["loss"], str(r["batch_per_gpu"]), f"{r['views_per_s']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{1000 * r['step_s']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}")
    Console().print(table)
    Console().print(f"SupCon / cross-entropy per-view rate: {report['supcon_vs_ce_views_ratio']:.3f}")
