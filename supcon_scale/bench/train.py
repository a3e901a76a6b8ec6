"""Training-step benchmark: a SupCon step vs a cross-entropy step of the same encoder, one process.

Both time the trainer's own `train_step` with the objective `loss.name` builds, so what is measured is what a run
executes (the views' concatenation, the batch-norm copy a skipped step restores, the objective's loss). The
cross-entropy step (one view, linear classifier) is the baseline measured in the same run: SupCon's target is >= 95%
of its per-view rate. Both run on synthetic tensors; `--data DIR` adds the SupCon step fed by a real loader
(`--backend`), so the input pipeline's share of the step shows. `--max-batch` searches the largest per-GPU batch
whose SupCon step fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from timm.optim import Lars

from supcon_scale import arguments, averaging, config, data, engines, models, objectives, optim, trainer
from supcon_scale.devices import select_device
from supcon_scale.distributed import Context, temporary_single_process_group
from supcon_scale.engines.zero_lars import ZeroLars, partition_layout

Batches = Iterator[tuple[list[torch.Tensor], torch.Tensor]]
SYNTHETIC_CLASSES = 1000  # ImageNet's: the width of the cross-entropy baseline's classifier on synthetic batches


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide peak RSS (Linux: KiB)


def synthetic_batches(cfg: config.RunConfig, ctx: Context, batch: int) -> Batches:
    """One fixed batch of `data.views` random views in the model's memory format, forever (no input pipeline);
    each view at its `data.view_sizes` size (multi-crop) or `data.image_size`."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    sizes = cfg.data.view_sizes or [cfg.data.image_size] * cfg.data.views
    views = [torch.randn(batch, 3, s, s, device=ctx.device).contiguous(memory_format=fmt) for s in sizes]
    return itertools.repeat((views, torch.randint(0, SYNTHETIC_CLASSES, (batch,), device=ctx.device)))


def loader_batches(loader: data.TrainLoader) -> Batches:
    """The training loader's `(views, labels)` batches, epoch after epoch, as the trainer receives them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def measure(
    cfg: config.RunConfig, ctx: Context, batch: int, steps: int, warmup: int, loss_name: str, source: str = "synthetic"
) -> dict[str, Any]:
    """Images/s and views/s of `trainer.train_step` with `loss_name`'s objective; `source`: synthetic|loader."""
    cfg = objectives.for_objective(cfg, loss_name)
    if source == "synthetic":
        batches, num_classes = synthetic_batches(cfg, ctx, batch), SYNTHETIC_CLASSES
    else:
        loader = data.build_train_loader(cfg.data, ctx, cfg.seed, None)
        batches, num_classes = loader_batches(loader), loader.num_classes
    objective = objectives.build(cfg, num_classes, ctx)
    torch.manual_seed(0)
    model = trainer.build_model(cfg, objective)  # the classifier of loss.ce_weight, as a run builds it
    engine = engines.build(engines.EngineSpec.from_run(cfg), ctx, model, total_steps=steps + warmup, warmup_steps=0)
    engine.train()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    done = itertools.count(1)
    siblings = averaging.has_siblings(model)  # model.momentum, train.ema_decay: their update is part of the step

    def one_step() -> None:
        views, labels = next(batches)
        stepped = trainer.train_step(engine, objective, views, labels).stepped
        step = next(done)
        if siblings and stepped:
            averaging.update(engine.unwrapped(), step, steps + warmup)

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
    views = cfg.data.views
    return {
        "loss": loss_name,
        "source": source,
        "batch_per_gpu": batch,
        "views": views,
        "step_s": seconds / steps,
        "images_per_s": batch * steps / seconds,
        "views_per_s": views * batch * steps / seconds,
        "peak_memory_bytes": _peak_bytes(ctx.device),
    }


def lars_step_seconds(cfg: config.RunConfig, ctx: Context, steps: int) -> dict[str, float]:
    """Median optimizer-step time of timm's foreach Lars over the model's tensors, and of ZeroLars over the same
    values flattened into one ZeRO partition per group (in a 1-rank group: the all-reduce included, no peer)."""
    model = models.build(cfg.model, image_size=cfg.data.image_size).to(ctx.device)
    groups = optim.param_groups(model.named_parameters(), cfg.optim)
    kwargs = {"lr": 1.0, "momentum": cfg.optim.momentum, "trust_coeff": cfg.optim.trust_coeff, "foreach": True}
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    flats, layouts = [], []
    for group in groups:
        tensors = [p.detach().flatten() for p in group["params"]]
        flat = torch.cat(tensors).requires_grad_()
        flat.grad = torch.cat([p.grad.flatten() for p in group["params"]])
        numels = [t.numel() for t in tensors]
        offsets = [sum(numels[:i]) for i in range(len(numels))]
        flats.append(flat)
        layouts.append(partition_layout(offsets, numels, flat.numel(), 0))
    params = [{"params": [f], "weight_decay": g["weight_decay"]} for f, g in zip(flats, groups, strict=True)]
    zero = ZeroLars(params, **kwargs)
    zero.attach(flats, layouts)
    timings = {}
    for name, opt in (("lars", Lars(groups, **kwargs)), ("zero_lars", zero)):
        times = []
        for _ in range(steps + 2):  # two warm-up steps (momentum buffers are created on the first)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            start = time.perf_counter()
            opt.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            times.append(time.perf_counter() - start)
        timings[f"{name}_step_s"] = sorted(times[2:])[len(times[2:]) // 2]
    timings["zero_lars_vs_lars"] = timings["zero_lars_step_s"] / timings["lars_step_s"]
    return timings


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch in [start, limit] for which `fits` holds (0 if none): doubling, then bisection.

    `fits` must be monotone (a batch that fits means every smaller one does), as memory use is.
    """
    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# What cuBLAS, cuDNN and the caching allocator say when device memory runs out (torch raises RuntimeError for the
# library ones, OutOfMemoryError only for its own allocator).
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_MAPPING_ERROR")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` means "the device ran out of memory" (so a smaller batch may fit), not a bug."""
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in OOM_MARKERS)


def step_fits(cfg: config.RunConfig, ctx: Context) -> Callable[[int], bool]:
    """Whether one SupCon training step at a batch runs without running out of device memory."""

    def fits(batch: int) -> bool:
        try:
            measure(with_batch(cfg, batch), ctx, batch, steps=1, warmup=0, loss_name="supcon")
            return True
        except RuntimeError as exc:  # torch.OutOfMemoryError is one; cuBLAS/cuDNN running out are plain ones
            if not is_out_of_memory(exc):
                raise
            return False
        finally:
            gc.collect()  # the failed step's model and activations sit in reference cycles with its traceback
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()

    return fits


def with_batch(cfg: config.RunConfig, batch: int) -> config.RunConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch_size=batch))


def main(argv: list[str] | None = None) -> int:
    args = arguments.bench_train().parse_args(argv)
    if args.batch_per_gpu < 2 or args.steps < 1:
        print("bench_train: --batch-per-gpu must be >= 2 and --steps >= 1", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"bench_train: --data {args.data}: no such folder", file=sys.stderr)
        return 2
    device = select_device(args.device, 0)  # --device cuda without usable CUDA: an error, never a CPU run
    ctx = Context(device=device)
    try:
        cfg = config.load(None, _overrides(args))
        # cross-entropy first: on the CPU the peak RSS is process-wide, so SupCon's figure includes CE's
        runs = [("cross_entropy", "synthetic"), ("supcon", "synthetic")]
        if args.data is not None:
            runs.append(("supcon", "loader"))
        results = [
            measure(cfg, ctx, args.batch_per_gpu, args.steps, args.warmup, name, source) for name, source in runs
        ]
    except (ValueError, ImportError) as exc:
        print(f"bench_train: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    report = _report(args, device, results)
    if args.lars:
        with temporary_single_process_group(ctx.device):  # ZeroLars all-reduces its norms, here over one rank
            report["lars"] = lars_step_seconds(cfg, ctx, args.steps)
    if args.max_batch:
        report["max_batch_per_gpu"] = largest_batch(step_fits(cfg, ctx), args.batch_per_gpu, args.max_batch)
    _print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """The run config's overrides for the command line's model, precision, engine and (`--data`) loader."""
    overrides = [
        f"model.encoder={args.model}",
        f"precision={args.precision}",
        f"data.image_size={args.image_size}",
        f"data.global_batch_size={args.batch_per_gpu}",
        f"model.channels_last={not args.no_channels_last}",
        f"model.activation_checkpointing={args.activation_checkpointing}",
        "loss.name=supcon",
        f"engine.name={args.engine}",
        f"engine.zero_stage={args.zero_stage}",
    ]
    if args.model_kwargs:  # JSON is YAML: the override is the mapping itself
        overrides.append(f"model.kwargs={json.dumps(args.model_kwargs)}")
    if args.data is not None:
        overrides += [
            f"data.root={args.data}",
            f"data.backend={args.backend}",
            f"data.workers={args.workers}",
            f"data.dali_threads={args.workers}",
            f"data.augment.preset={args.preset}",
        ]
    return overrides


def _report(args: argparse.Namespace, device: torch.device, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON report: the settings, each run's figures, SupCon's per-view rate against cross-entropy's."""
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    report: dict[str, Any] = {
        "device": device_name,
        "model": args.model,
        "model_kwargs": args.model_kwargs or {},
        "precision": args.precision,
        "image_size": args.image_size,
        "engine": args.engine,
        "zero_stage": args.zero_stage if args.engine == "deepspeed" else None,
        "activation_checkpointing": args.activation_checkpointing,
        "results": results,
        "supcon_vs_ce_views_ratio": results[1]["views_per_s"] / results[0]["views_per_s"],
        "torch": torch.__version__,
    }
    if args.data is not None:
        report["loader"] = {
            "backend": args.backend,
            "data": str(args.data),
            "workers": args.workers,
            "preset": args.preset,
            "vs_synthetic": results[2]["views_per_s"] / results[1]["views_per_s"],
        }
    return report


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"train step: {report['model']} {report['precision']} {report['image_size']}px, {report['engine']}"
        f" on {report['device']}"
    )
    for col in ("loss", "data", "batch", "views/s", "images/s", "step ms", "peak MiB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            r["loss"],
            r["source"],
            str(r["batch_per_gpu"]),
            f"{r['views_per_s']:.1f}",
            f"{r['images_per_s']:.1f}",
            f"{1000 * r['step_s']:.1f}",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
        )
    Console().print(table)
    Console().print(f"SupCon / cross-entropy per-view rate: {report['supcon_vs_ce_views_ratio']:.3f}")
    if "loader" in report:
        Console().print(
            f"SupCon with the {report['loader']['backend']} loader / synthetic: {report['loader']['vs_synthetic']:.3f}"
        )
    if "lars" in report:
        r = report["lars"]
        Console().print(
            f"LARS step: timm {1000 * r['lars_step_s']:.2f} ms, ZeroLars on flat partitions "
            f"{1000 * r['zero_lars_step_s']:.2f} ms ({r['zero_lars_vs_lars']:.2f}x)"
        )
    if "max_batch_per_gpu" in report:
        Console().print(f"largest SupCon batch per GPU that fits: {report['max_batch_per_gpu']}")
