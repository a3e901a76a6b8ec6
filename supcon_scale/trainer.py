"""The training loop: `build` the run's parts, then `run_loop`: resume and one flat loop over `train_step`.

Everything with a cadence of its own (metrics, checkpoints and the preemption save, the kNN monitor, the caller's
hooks) sees each step through the `Hook` protocol (supcon_scale/hooks.py) and decides for itself when to act.
The continual run (continual/learner.py) builds a `Loop` of its own parts and runs it through the same `run_loop`.
"""

from __future__ import annotations

import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from supcon_scale import averaging, config, data, distributed, engines, models, objectives
from supcon_scale.checkpoint import Checkpointer
from supcon_scale.console import NO_CLOCK, Clock, MetricsLog, TrainLogger, console
from supcon_scale.distributed import Context, seed_everything
from supcon_scale.engines import Engine, EngineSpec
from supcon_scale.hooks import Hook, StepInfo
from supcon_scale.profiling import Profiler
from supcon_scale.resilience import NonFiniteGuard


@dataclass
class FitResult:
    step: int
    epoch: int
    loss: float
    seconds: float
    encoder_path: Path | None
    skipped_steps: int


class StepResult(NamedTuple):
    """What `train_step` returns: the loss (detached), whether the update was taken, and the model's output per
    sample, detached (`[B, V, D]` embeddings or a `models.Output`; the hooks see it as `StepInfo.output`)."""

    loss: torch.Tensor
    stepped: bool
    output: Any


def train_step(
    engine: Engine,
    objective: objectives.Objective,
    views: list[torch.Tensor],
    labels: torch.Tensor,
    clock: Clock = NO_CLOCK,
) -> StepResult:
    """One update on a batch of V views: views of one size share one forward pass (and its batch-norm statistics).

    `clock` (the logger's console.StepClock) is marked here, where the step's phases begin and end."""
    clock.start()
    # A skipped (non-finite) step must leave no trace, but its forward already updated the batch-norm running
    # statistics, with NaN. They are small (~0.1% of ResNet-50's parameters): one fused copy into buffers kept
    # from the first step (no allocation per step), put back only on the rare skipped step.
    buffers, shadow = _float_buffers(engine.unwrapped())
    if buffers:
        torch._foreach_copy_(shadow, buffers)
    with engine.autocast():
        views, targets = objective.prepare(views, labels)
        out = engine(views)
    out = objectives.per_sample(out, len(views))
    loss = objective(loss_input(out), targets)
    engine.backward(loss)
    clock.mark()
    stepped = engine.step()
    if not stepped and buffers:
        with torch.no_grad():
            torch._foreach_copy_(buffers, shadow)
    clock.stop()
    return StepResult(loss.detach(), stepped, _detached(out))


def loss_input(out: torch.Tensor | models.Output) -> torch.Tensor | models.Output:
    """What the objective scores: the features the online probe reads are not its business (they are left out),
    and an `Output` holding nothing else is its embeddings alone."""
    if not isinstance(out, models.Output):
        return out
    out = out._replace(features=None)
    return out.z if all(t is None for t in out[1:]) else out


def _detached(out: torch.Tensor | models.Output) -> torch.Tensor | models.Output:
    if isinstance(out, models.Output):
        return models.Output(*(None if t is None else t.detach() for t in out))
    return out.detach()


_SHADOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _float_buffers(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's floating-point buffers and same-shaped copies made once (again if the buffers change)."""
    buffers = [t for t in model.buffers() if t.is_floating_point()]
    kept = _SHADOWS.get(model)
    if kept is None or len(kept[0]) != len(buffers) or any(a is not b for a, b in zip(kept[0], buffers, strict=True)):
        kept = (buffers, [torch.empty_like(t) for t in buffers])
        _SHADOWS[model] = kept
    return kept


Batch = tuple[int, bool, list[torch.Tensor], torch.Tensor]  # (epoch, epoch_end, views, labels)


@dataclass
class Loop:
    """The parts one training loop runs: `fit` builds them from a RunConfig, the continual run from its stream.

    `batches(step, epoch)` yields the run's batches from where `checkpointer.resume()` left it; `hooks` are every
    hook in call order (the logger's feeders, e.g. the online probe, then the logger, then the rest);
    `total_steps` is the run's last step."""

    engine: Engine
    objective: objectives.Objective
    batches: Callable[[int, int], Iterable[Batch]]
    logger: TrainLogger
    checkpointer: Checkpointer
    hooks: list[Hook]
    guard: NonFiniteGuard
    total_steps: int


def run_loop(parts: Loop) -> tuple[int, int]:
    """Resume, then one flat loop over `train_step`: after each step the hooks, then the checkpointer, see it.

    Returns the (step, epoch) where the run stopped."""
    step, epoch = parts.checkpointer.resume()
    for hook in parts.hooks:
        hook.on_resume(step, epoch)
    parts.engine.train()
    world = parts.engine.ctx.world_size
    batches = parts.logger.clock.batches(parts.batches(step, epoch))
    with parts.checkpointer, parts.logger:
        for epoch, epoch_end, views, labels in batches:
            for hook in parts.hooks:
                views, labels = hook.on_batch(step + 1, views, labels)
            loss, stepped, output = train_step(parts.engine, parts.objective, views, labels, parts.logger.clock)
            step += 1
            parts.guard.update(step, loss, stepped, parts.checkpointer.newest)
            views_seen = len(views) * len(labels) * world
            last = step == parts.total_steps
            info = StepInfo(step, epoch, loss, stepped, views_seen, epoch_end, last, output, labels)
            for component in (*parts.hooks, parts.checkpointer):
                component.on_step(info)
    return step, epoch


def build(cfg: config.RunConfig, ctx: Context, hooks: Sequence[Hook] = ()) -> Loop:
    """The parts of the training run `cfg` on this process: loader, objective, model, engine, logger, monitors,
    checkpointer (every check that can refuse the run comes before anything is written)."""
    distributed.agree_on_config(cfg.to_dict())  # before any collective a divergent config could deadlock
    config.check_run(cfg, ctx.world_size, ctx.device.type)
    engines.check(EngineSpec.from_run(cfg), ctx.device.type)  # the engine's rules, before anything is written
    models.check(cfg)  # model.encoder and model.kwargs against timm, on the meta device
    check_monitors(cfg)  # a monitor's inputs, before the data scan writes anything and before the first step
    loader = data.build_train_loader(cfg.data, ctx, cfg.seed, Path(cfg.out_dir))
    objective = objectives.build(cfg, loader.num_classes, ctx, loader.classes_present)
    seed_everything(cfg.seed)  # the same weights on every rank and the same RNG streams, whatever ran before
    model = build_model(cfg, objective)
    total_steps, warmup_steps = schedule_steps(cfg.train, loader.steps_per_epoch)
    engine = engines.build(EngineSpec.from_run(cfg), ctx, model, total_steps, warmup_steps)
    feeders = log_feeders(cfg, model.encoder.num_features, loader.num_classes, ctx)  # the probe: before the logger
    # metrics.jsonl and its sinks, the log lines, the time shares, the collapse watch
    watch = None if objectives.trains_classifier(cfg.loss.name) else objective.uniform_loss  # embeddings only
    logger = TrainLogger(cfg, engine, total_steps, feeders, watch)
    updates = averaging.update_hooks(engine.unwrapped(), total_steps)  # the siblings follow each applied step
    # the objective's hooks (its key queue) are stateful: in the list the Checkpointer saves and restores
    hooks = [
        *feeders,
        logger,
        *updates,
        *objective.hooks(),
        *hooks,
        *monitors(cfg, engine, loader.steps_per_epoch, logger.metrics),
    ]
    checkpointer = Checkpointer(cfg, ctx, engine, loader, objective, hooks)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, fp16=cfg.precision == "fp16")

    def batches(step: int, epoch: int) -> Iterator[Batch]:
        return itertools.islice(epochs(loader, epoch, cfg.train.epochs), total_steps - step)

    return Loop(engine, objective, batches, logger, checkpointer, hooks, guard, total_steps)


def fit(cfg: config.RunConfig, ctx: Context, hooks: Sequence[Hook] = ()) -> FitResult:
    """Train `cfg` on this process's share of the job and export the encoder; returns where it stopped."""
    start = time.time()
    parts = build(cfg, ctx, hooks)
    step, epoch = run_loop(parts)
    encoder_path = parts.checkpointer.export()
    if ctx.is_main and encoder_path is not None:
        console.print(f"[green]done[/] step {step}, epoch {epoch}: encoder exported to {encoder_path}")
    return FitResult(step, epoch, parts.logger.loss, time.time() - start, encoder_path, parts.engine.skipped_steps)


def build_model(cfg: config.RunConfig, objective: objectives.Objective) -> models.SupConModel:
    """The model `cfg` trains with `objective`: its head (projection or classifier), the classifier beside the
    projection that `loss.ce_weight` trains, and the detached encoder features the online probe reads."""
    return models.build(
        cfg.model, objective.classifier_classes, cfg.data.image_size, cfg.train.ema_decay,
        ce_classes=objective.ce_classes, features=cfg.train.online_probe,
    )  # fmt: skip


def log_feeders(cfg: config.RunConfig, num_features: int, num_classes: int, ctx: Context) -> list[Hook]:
    """The hooks whose numbers join the log line (`train.online_probe`): they run before the TrainLogger."""
    if not cfg.train.online_probe:
        if cfg.train.online_probe_lr != config.TrainConfig().online_probe_lr:
            warnings.warn("train.online_probe_lr only acts with train.online_probe=true", stacklevel=2)
        return []
    from supcon_scale.evaluation.probe import OnlineProbe  # evaluation sits beside the trainer; imported when used

    lr = cfg.train.online_probe_lr
    return [OnlineProbe(num_features, num_classes, lr, ctx.device, cfg.seed, equal_batches=cfg.data.drop_last)]


def schedule_steps(train: config.TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total, warm-up) optimizer steps of the run: `train.epochs` epochs, cut at `train.max_steps`."""
    total = train.epochs * steps_per_epoch
    if train.max_steps is not None:
        total = min(total, train.max_steps)
    return total, min(total, round(train.warmup_epochs * steps_per_epoch))


def epochs(loader: data.TrainLoader, epoch: int, num_epochs: int) -> Iterator[tuple[int, bool, list, torch.Tensor]]:
    """`(epoch, epoch_end, views, labels)` from the loader's position to the end of the run's last epoch.

    A loader restored at the end of its epoch (a checkpoint taken there) moves on to the next one.
    """
    while epoch < num_epochs:
        remaining = len(loader)
        for i, (views, labels) in enumerate(loader if remaining else ()):
            yield epoch, i == remaining - 1, views, labels
        epoch += 1
        if epoch < num_epochs:
            loader.set_epoch(epoch)


def check_monitors(cfg: config.RunConfig) -> None:
    """The monitors' inputs at start (`train.knn_every_epochs` needs data.root/train and /val with the same classes),
    so a missing split is a one-line error before training, not a crash at the first epoch's end."""
    if cfg.train.knn_every_epochs:
        from supcon_scale.evaluation.knn import check_monitor_data

        check_monitor_data(cfg.data.root)


def monitors(cfg: config.RunConfig, engine: Engine, steps_per_epoch: int, metrics: MetricsLog) -> list[Hook]:
    """The monitors the config asks for (`train.knn_every_epochs`, `train.profile_steps`); rows go to `metrics`."""
    found: list[Hook] = []
    if cfg.train.knn_every_epochs:
        from supcon_scale.evaluation.knn import KnnMonitor  # evaluation sits beside the trainer; imported when used

        every = steps_per_epoch * cfg.train.knn_every_epochs
        found.append(
            KnnMonitor(engine.unwrapped().encoder, Path(cfg.data.root), cfg.data.image_size, every, metrics, engine)
        )
    if cfg.train.profile_steps:
        first, last = config.profile_range(cfg.train.profile_steps)
        found.append(Profiler(first, last, cfg.out_dir, engine.ctx.rank, engine.ctx.device))
    return found
