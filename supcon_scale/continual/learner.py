"""One continual run (a method and a seed) on the trainer's loop: `build` makes its parts, `trainer.run_loop`
runs them, as it runs a training run's.

The parts: the stream's schedule as the loader (replay.StreamLoader; the trainer's epochs are the tasks), SCR or ER
as the objective (scr.py, er.py), the replay memory as a hook (replay.Replay: the memory batch beside each incoming
batch, the reservoir update after the step), the accuracy matrix as a hook whose cadence is the task boundary
(evaluate.AccuracyMatrix), the engine (ddp, or deepspeed ZeRO <= 2), the trainer's logger with its sinks, and the
Checkpointer (every task's end and every `train.checkpoint_every_steps`, the preemption save, the out_dir lock)
with this module's resume rules. Steps go through `trainer.train_step`, so a skipped (non-finite) step leaves no
trace, batch-norm statistics included.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supcon_scale import checkpoint, engines, trainer
from supcon_scale.checkpoint import Checkpointer
from supcon_scale.config import EngineConfig, LogConfig, OptimConfig
from supcon_scale.console import TrainLogger
from supcon_scale.continual import config, metrics, models
from supcon_scale.continual.config import ContinualConfig, ContinualOptimConfig, ContinualTrainConfig
from supcon_scale.continual.er import ERObjective
from supcon_scale.continual.evaluate import AccuracyMatrix
from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.continual.replay import Replay, StreamLoader
from supcon_scale.continual.scr import SCRObjective
from supcon_scale.continual.stream import ImageSource, build_stream, load_sources
from supcon_scale.distributed import Context, flatten
from supcon_scale.engines import EngineSpec
from supcon_scale.files import write_text
from supcon_scale.hooks import Hook
from supcon_scale.objectives import Objective
from supcon_scale.resilience import NonFiniteGuard
from supcon_scale.resume import under

RESULT = "result.json"
# Keys a continual run may change when it resumes: where it writes, which runs it makes, how it saves and reports.
# Any other change (the stream's tasks, classes, order; the memory; the model, the optimizer) cannot continue.
FREE = ("out_dir", "methods", "seeds", "train", "log", "engine.backend", "data.on_bad_file")


@dataclass
class RunResult:
    method: str
    seed: int
    matrix: list[list[float | None]]  # a[i][j], None above the diagonal
    summary: dict[str, Any]
    steps: int
    seconds: float
    skipped_steps: int = 0
    classes: list[list[str]] = field(default_factory=list)  # the class names of each task

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "matrix": self.matrix,
            **self.summary,
            "steps": self.steps,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
            "tasks": self.classes,
        }


def run_dir(cfg: ContinualConfig, method: str, seed: int) -> Path:
    return Path(cfg.out_dir) / method / f"seed_{seed}"


def engine_spec(cfg: ContinualConfig, world_size: int) -> EngineSpec:
    """What the engines read of this run: the step's LR is `optim.lr` itself (`scale_lr=False`), held constant."""
    batch = cfg.stream.batch_size + cfg.memory.batch_size
    return EngineSpec(
        engine=cfg.engine,
        optim=OptimConfig(
            name=cfg.optim.name,
            base_lr=cfg.optim.lr,
            scale_lr=False,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            schedule="constant",
            exclude_bn_bias=False,
        ),
        precision=cfg.precision,
        global_batch=-(-batch // world_size) * world_size,  # DeepSpeed wants train_batch_size = micro batch x ranks
        image_size=cfg.data.image_size,
        channels_last=cfg.model.channels_last,
        sync_bn=cfg.model.sync_bn,
    )


@dataclass(frozen=True)
class ContinualRun:
    """One run of a continual config as the trainer's logger and checkpointer read a run: its own out_dir
    (`run_dir`), its seed, the train / log / optim / engine sections, and the config its checkpoints keep."""

    cfg: ContinualConfig
    method: str
    seed: int
    loss: dict[str, Any]  # the objective's convention, kept in every checkpoint's config

    @property
    def out_dir(self) -> str:
        return str(run_dir(self.cfg, self.method, self.seed))

    @property
    def train(self) -> ContinualTrainConfig:
        return self.cfg.train

    @property
    def log(self) -> LogConfig:
        return self.cfg.log

    @property
    def optim(self) -> ContinualOptimConfig:
        return self.cfg.optim

    @property
    def engine(self) -> EngineConfig:
        return self.cfg.engine

    def to_dict(self) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "loss": self.loss, "method": self.method, "seed": self.seed}


class ContinualCheckpointer(Checkpointer):
    """The trainer's Checkpointer under a continual run's resume rules: only the keys of FREE may change, the same
    world size (the memory's bytes are sharded by rank), the same method and seed."""

    run: ContinualRun

    def __init__(
        self,
        run: ContinualRun,
        ctx: Context,
        engine: engines.Engine,
        loader: StreamLoader,
        objective: Objective,
        hooks: list[Hook],
    ):
        super().__init__(run, ctx, engine, loader, objective, hooks)
        self.run = run

    def check_resume(self, meta: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
        _refuse_changes(meta["config"], self.run.cfg, path)
        if int(meta["world_size"]) != self.ctx.world_size or not (path / f"rank_{self.ctx.rank}.pt").is_file():
            # The memory's bytes are sharded by rank: another world size would lose or duplicate samples.
            raise ValueError(
                f"train.resume: {path} was saved by {meta['world_size']} ranks but this run has "
                f"{self.ctx.world_size}; relaunch with {meta['world_size']} ranks"
            )
        saved = meta["config"]
        if (saved.get("method"), saved.get("seed")) != (self.run.method, self.run.seed):
            raise ValueError(
                f"train.resume: {path} is a checkpoint of {saved.get('method')} seed {saved.get('seed')}, "
                f"not {self.run.method} seed {self.run.seed}"
            )
        return {}


@dataclass
class ContinualParts:
    """A continual run's trainer parts, and what its result reads."""

    run: ContinualRun
    loop: trainer.Loop
    matrix: AccuracyMatrix
    classes: list[list[str]]  # the class names of each task
    start: float  # when the run began (time.time())


def build(
    cfg: ContinualConfig,
    method: str,
    seed: int,
    ctx: Context,
    sources: tuple[ImageSource, ImageSource] | None = None,
    hooks: Sequence[Hook] = (),
) -> ContinualParts:
    """The parts of run (`method`, `seed`) on the class-incremental stream of `seed`, for `trainer.run_loop`."""
    start = time.time()
    config.check(cfg, ctx.world_size)
    train, test = sources if sources is not None else load_sources(cfg, ctx)
    stream = build_stream(cfg, train, test, seed)
    memory = ReservoirMemory(cfg.memory.size, seed, ctx.rank, ctx.world_size)
    replay: Replay | None = None  # ER's loss reads the step's memory batch from the replay hook, built below
    if method == "scr":
        objective: SCRObjective | ERObjective = SCRObjective(cfg)
    else:
        objective = ERObjective(cfg, len(train.classes), ctx.world_size, lambda: replay.drawn if replay else 0)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = models.build(cfg.model, objective.classifier_classes)
    loader = StreamLoader(stream, train, objective.transforms, ctx, models.DTYPES[cfg.model.dtype])
    replay = Replay(memory, loader, cfg.memory.batch_size)
    engine = engines.build(engine_spec(cfg, ctx.world_size), ctx, model, len(loader), 0)
    run = ContinualRun(cfg, method, seed, objective.convention())
    logger = TrainLogger(run, engine, len(loader))  # metrics.jsonl and its sinks, the log lines, the time shares
    name = f"{method} seed {seed}"
    matrix = AccuracyMatrix(cfg, engine, objective.classifier, memory, stream, test, logger.metrics, name)
    every = [logger, replay, matrix, *hooks]
    checkpointer = ContinualCheckpointer(run, ctx, engine, loader, objective, every)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, fp16=cfg.precision == "fp16")
    loop = trainer.Loop(engine, objective, lambda step, epoch: loader.batches(), logger, checkpointer, every, guard,
                        len(loader))  # fmt: skip
    return ContinualParts(run, loop, matrix, [[train.classes[c] for c in t] for t in stream.tasks], start)


def fit(
    cfg: ContinualConfig,
    method: str,
    seed: int,
    ctx: Context,
    sources: tuple[ImageSource, ImageSource] | None = None,
    hooks: Sequence[Hook] = (),
) -> RunResult:
    """Train `method` on the class-incremental stream of `seed` and score it after every task."""
    return train(build(cfg, method, seed, ctx, sources, hooks))


def train(parts: ContinualParts) -> RunResult:
    """Run `parts` through the trainer's loop, then write the run's result (rank 0)."""
    step, _ = trainer.run_loop(parts.loop)
    cfg, method, seed, rows = parts.run.cfg, parts.run.method, parts.run.seed, parts.matrix.rows
    seconds, skipped = time.time() - parts.start, parts.loop.engine.skipped_steps
    result = RunResult(method, seed, rows, metrics.summarize(metrics.as_matrix(rows)), step, seconds, skipped,
                       parts.classes)  # fmt: skip
    if parts.loop.engine.ctx.is_main:  # the config beside the result: a later resume under another stream is refused
        out = run_dir(cfg, method, seed) / RESULT
        write_text(out, json.dumps(plain_json({**result.to_dict(), "config": cfg.to_dict()}), indent=2))
    return result


def _refuse_changes(saved: dict[str, Any], cfg: ContinualConfig, source: Path) -> None:
    """A one-line ValueError naming every key that differs from `saved` (the config `source` was run with)."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    found = [k for k, v in new.items() if k in old and not under(k, FREE) and json.dumps(old[k]) != json.dumps(v)]
    if found:
        listed = ", ".join(f"{k} {json.dumps(old[k])} -> {json.dumps(new[k])}" for k in found)
        raise ValueError(
            f"train.resume: {source} was run with another config: {listed}; a changed stream, memory or model "
            "cannot continue it: set these back, or choose another out_dir"
        )


def check_resumable(cfg: ContinualConfig, method: str, seed: int) -> None:
    """Before any run trains: the finished result or the checkpoint this run would continue from was made under
    this config (a 2-task result under a 5-task config, or a stream changed mid-run, is refused by name)."""
    if cfg.train.resume is None:
        return
    where = run_dir(cfg, method, seed)
    if cfg.train.resume == "auto" and (where / RESULT).is_file():
        try:
            done = json.loads((where / RESULT).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where / RESULT}: not readable JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(done, dict):
            raise ValueError(f"{where / RESULT}: not a result (a JSON object)")
        if isinstance(done.get("config"), dict):
            _refuse_changes(done["config"], cfg, where / RESULT)
        elif len(done.get("matrix") or []) != cfg.stream.tasks:  # a result written before the config was kept
            raise ValueError(
                f"train.resume: {where / RESULT} holds {len(done.get('matrix') or [])} tasks but stream.tasks="
                f"{cfg.stream.tasks}; choose another out_dir"
            )
        return
    path = checkpoint.latest(where) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is not None and checkpoint.is_complete(path):
        _refuse_changes(checkpoint.read_meta(path)["config"], cfg, path)


def plain_json(obj: Any) -> Any:
    """NaN (forgetting of a single task, an interval over one seed) as null: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    return obj


def load_result(cfg: ContinualConfig, method: str, seed: int) -> RunResult | None:
    """The finished run's result, if `run_dir` holds one."""
    path = run_dir(cfg, method, seed) / RESULT
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    summary = {
        k: d[k]
        for k in ("final_average_accuracy", "average_forgetting", "average_incremental_accuracy", "stage_accuracy")
    }
    return RunResult(
        d["method"], d["seed"], d["matrix"], summary, d["steps"], d["seconds"], d["skipped_steps"], d["tasks"]
    )
