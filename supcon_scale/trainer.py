"""The training loop: data -> engine -> loss -> step, with logging, checkpoints, resume and preemption."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from supcon_scale import checkpoint, config, data, engines, models, objectives
from supcon_scale.console import MetricsLog, TrainProgress, console
from supcon_scale.distributed import Context, all_reduce_mean
from supcon_scale.engines import Engine
from supcon_scale.resilience import NonFiniteGuard, Preempted, PreemptionHandler

# Called after every optimizer step as hook(step, epoch); used by the kNN monitor and by fault-injection tests.
StepHook = Callable[[int, int], None]


@dataclass
class FitResult:
    step: int
    epoch: int
    loss: float
    seconds: float
    encoder_path: Path | None
    skipped_steps: int


def train_step(engine: Engine, objective: objectives.Objective, views: list[torch.Tensor], labels: torch.Tensor):
    """One update on a batch of V views: all views share one forward pass (and its batch-norm statistics)."""
    b = labels.shape[0]
    # A skipped (non-finite) step must leave no trace, but its forward already updated the batch-norm running
    # statistics, with NaN. They are small (~0.1% of ResNet-50's parameters): keep a copy to put back.
    buffers = [t for t in engine.unwrapped().buffers() if t.is_floating_point()]
    saved = [t.detach().clone() for t in buffers]
    with engine.autocast():
        views, targets = objective.prepare(views, labels)
        out = engine(torch.cat(views))
    out = out.float().reshape(len(views), b, -1).transpose(0, 1)  # [B, V, D]
    loss = objective(out, targets)
    engine.backward(loss)
    stepped = engine.step()
    if not stepped:
        with torch.no_grad():
            for t, kept in zip(buffers, saved):
                t.copy_(kept)
    return loss.detach(), stepped


def fit(cfg: config.RunConfig, ctx: Context, hooks: tuple[StepHook, ...] = ()) -> FitResult:
    """Train `cfg` on this process's share of the job and export the encoder; returns where it stopped."""
    cfg.validate(ctx.world_size)
    out_dir = Path(cfg.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out_dir / "config.yaml")

    loader = data.build_train_loader(cfg.data, ctx, cfg.seed, out_dir)
    if loader.num_classes < 2 and cfg.loss.name != "simclr":
        # One class: every other sample is a positive and none is a negative, so SupCon only pulls embeddings
        # together (collapse) and cross-entropy has nothing to learn. SimCLR ignores labels and is fine.
        raise ValueError(
            f"data.root: {cfg.data.root} has a single class; loss.name={cfg.loss.name} needs at least 2 "
            "(use loss.name=simclr for unlabelled data)"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, whatever ran before
    model = models.build(cfg.model, loader.num_classes if cfg.loss.name == "cross_entropy" else None)
    total_steps = cfg.train.epochs * loader.steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    warmup_steps = min(total_steps, round(cfg.train.warmup_epochs * loader.steps_per_epoch))
    engine = engines.build(cfg, ctx, model, total_steps, warmup_steps)
    objective = objectives.build(cfg, loader.num_classes, ctx)

    step, epoch = _resume(cfg, engine, loader)
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=ctx.is_main)
    if cfg.train.knn_every_epochs:
        hooks = (*hooks, _knn_monitor(cfg, engine, metrics, loader.steps_per_epoch))
    guard = NonFiniteGuard(cfg.train.max_bad_steps, fp16=cfg.precision == "fp16")
    preemption = PreemptionHandler(cfg.train.preempt_signal)
    newest = checkpoint.latest(out_dir)
    loss_value, start, window_start, window_views = float("nan"), time.time(), time.time(), 0

    saved_step = step

    def save() -> None:
        nonlocal newest, saved_step
        newest = checkpoint.save(
            out_dir, step, epoch, engine.state_dict(), cfg.to_dict(), loader.state_dict(), cfg.train.keep_last,
            extra_meta={"loss_convention": objective.convention()},
        )
        saved_step = step

    engine.train()
    try:
        with TrainProgress(total_steps, step, enabled=ctx.is_main and cfg.train.progress) as progress:
            while step < total_steps and epoch < cfg.train.epochs:
                for views, labels in loader:
                    loss, stepped = train_step(engine, objective, views, labels)
                    step += 1
                    window_views += len(views) * labels.shape[0] * ctx.world_size
                    # every step: a good one resets the count of bad steps "in a row"
                    guard.update(step, loss.item() if not stepped else 0.0, stepped, str(newest) if newest else None)
                    if step % cfg.train.log_every == 0 or step == total_steps:
                        loss_value = all_reduce_mean(loss).item()
                        rate = window_views / max(time.time() - window_start, 1e-9)
                        metrics.write({"step": step, "epoch": epoch, "loss": loss_value, "lr": engine.lr,
                                       "views_per_s": rate, "skipped_steps": engine.skipped_steps})
                        progress.update(step, f"epoch {epoch} loss {loss_value:.4f} {rate:,.0f} views/s")
                        window_start, window_views = time.time(), 0
                    for hook in hooks:
                        hook(step, epoch)
                    if preemption.requested(ctx.device):
                        save()
                        raise Preempted(f"preempted at step {step}; checkpoint {newest}")
                    if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                        save()
                    if step >= total_steps:
                        break
                if step != saved_step:  # the end of an epoch, or of the run
                    save()
                if step >= total_steps:
                    break
                epoch += 1
                loader.set_epoch(epoch)
    finally:
        preemption.close()

    encoder_path = out_dir / "encoder.safetensors"
    if ctx.is_main and newest is not None:
        checkpoint.copy_atomic(newest / "encoder.safetensors", encoder_path)
        console.print(f"[green]done[/] step {step}, epoch {epoch}: encoder exported to {encoder_path}")
    return FitResult(step, epoch, loss_value, time.time() - start, encoder_path if newest else None, engine.skipped_steps)


def _knn_monitor(cfg: config.RunConfig, engine: Engine, metrics: MetricsLog, steps_per_epoch: int) -> StepHook:
    """Weighted kNN (k=200, T=0.07) of the encoder on `data.root/val` every `train.knn_every_epochs` epochs."""
    from supcon_scale.evaluation.knn import knn_eval  # evaluation sits beside the trainer; imported only when used

    root = Path(cfg.data.root)
    every = steps_per_epoch * cfg.train.knn_every_epochs

    def hook(step: int, epoch: int) -> None:
        if step % every == 0:
            result = knn_eval(engine.unwrapped().encoder, root / "train", root / "val", image_size=cfg.data.image_size)
            metrics.write({"step": step, "epoch": epoch, "knn_top1": result["top1"], "knn_top5": result["top5"]})

    return hook


def _resume(cfg: config.RunConfig, engine: Engine, loader: Any) -> tuple[int, int]:
    """Restore engine, data position and RNG from `train.resume`; returns (step, epoch) to continue from."""
    path = cfg.train.resume
    if path == "auto":
        found = checkpoint.latest(cfg.out_dir)
        path = str(found) if found is not None else None
    if path is None:
        existing = checkpoint.latest(cfg.out_dir)
        if existing is not None:
            # Starting over here would interleave two runs' checkpoints (and keep_last would prune the new ones).
            raise ValueError(
                f"out_dir: {cfg.out_dir} already holds checkpoints (newest {existing.name}); set train.resume=auto "
                "to continue that run, or choose another out_dir"
            )
        loader.set_epoch(0)
        return 0, 0
    meta, engine_state, rank_state = checkpoint.load(path)
    saved_world = int(meta["world_size"])
    if saved_world != loader.ctx.world_size:
        # The data position and per-rank RNG streams are per rank: refuse rather than drop or repeat samples.
        raise ValueError(
            f"train.resume: {path} was saved by {saved_world} ranks but this run has {loader.ctx.world_size}; "
            f"relaunch with {saved_world} ranks (or start a new out_dir)"
        )
    if meta["config"]["model"]["encoder"] != cfg.model.encoder:
        raise ValueError(
            f"train.resume: {path} holds model.encoder={meta['config']['model']['encoder']}, "
            f"this run has model.encoder={cfg.model.encoder}"
        )
    checkpoint.check_matching(engine.unwrapped().state_dict(), engine_state["model"], str(path))
    engine.load_state_dict(engine_state)
    if rank_state is None:
        raise ValueError(
            f"train.resume: {path} was saved by {meta['world_size']} ranks; this rank has no saved position "
            f"(world size now differs)"
        )
    loader.load_state_dict(rank_state["data"])
    checkpoint.set_rng_state(rank_state["rng"])
    step, epoch = int(meta["step"]), int(meta["epoch"])
    console.print(f"resumed from {path} at step {step}, epoch {epoch}")
    if len(loader) == 0:  # saved at the end of its epoch: continue with the next one
        epoch += 1
        loader.set_epoch(epoch)
    return step, epoch
