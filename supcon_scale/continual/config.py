"""The `continual` command's typed config: YAML (with `base:`) plus dotted overrides, as the training config.

Its own schema, declared and read with the project's config helpers (`key(...)` with a one-line description and a
range per key, `base:` chains, overrides typed by their key), so an unknown key (with the nearest valid name), a
wrong type or an out-of-range value raises a one-line ConfigError naming the dotted key. This module adds list
keys (methods, seeds, a class order). The dataset-dependent checks (a task without classes, a memory larger than
the stream, unknown class names) run when the stream is built (`stream.build_stream`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from supcon_scale import config as base
from supcon_scale.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    ConfigError,
    EngineConfig,
    LogConfig,
    key,
)
from supcon_scale.engines.rules import check_deepspeed, check_replicated
from supcon_scale.files import write_text

METHODS = ("scr", "er")


def _section(cls: type, help: str, **defaults: Any) -> Any:
    return field(default_factory=lambda: cls(**defaults), metadata={"help": help})


def _list_key(default: list, help: str) -> Any:
    """A list key (`key()` takes immutable defaults only)."""
    return field(default_factory=lambda: list(default), metadata={"help": help, "range": None, "nonempty": False})


@dataclass(kw_only=True)
class ContinualDataConfig:
    """The labelled images the stream is cut from."""

    format: Literal["folder", "shards", "cifar"] = key(
        "folder", "folder (ROOT/train/<class>/*, ROOT/val/<class>/*), shards (ROOT/train, ROOT/val) or cifar"
    )
    root: str = key(
        "runs/continual/data", "the image folder, or the extracted CIFAR archive (never downloaded)", nonempty=True
    )
    image_size: int = key(32, "side of every view, train and test, in pixels", ge=8)
    mean: tuple[float, float, float] = key(IMAGENET_MEAN, "per-channel normalisation mean of every view", ge=0, le=1)
    std: tuple[float, float, float] = key(IMAGENET_STD, "per-channel normalisation std of every view", gt=0)
    on_bad_file: Literal["skip", "fail"] = key("skip", "an undecodable image: skip it (listed) or stop the run")


@dataclass(kw_only=True)
class StreamConfig:
    """How the classes are split into tasks and how each task's samples arrive."""

    tasks: int = key(5, "number of tasks T; the classes are split into T groups of sizes differing by <= 1", ge=1)
    class_order: list[str | int] | None = key(
        None, "the classes in the order they arrive (names or indices; may be a subset); null: see shuffle_classes"
    )
    shuffle_classes: bool = key(True, "without class_order: a per-seed permutation of the classes (false: sorted)")
    batch_size: int = key(10, "incoming samples per step over all ranks (the SCR paper's online setting: 10)", ge=1)
    epochs: int = key(1, "passes over each task's samples: 1 = online, more = offline", ge=1)


@dataclass(kw_only=True)
class MemoryConfig:
    """The replay memory: reservoir sampling over the whole stream, stored as encoded image bytes."""

    size: int = key(200, "M, samples kept over the whole stream (all ranks together)", ge=1)
    batch_size: int = key(100, "memory samples drawn per step beside the incoming batch (all ranks together)", ge=0)


@dataclass(kw_only=True)
class SCRConfig:
    """Supervised Contrastive Replay: SupCon on two views of incoming + memory, NCM at test time."""

    temperature: float = key(0.07, "SupCon temperature tau (0.07 in the SCR paper)", gt=0)
    original_view: bool = key(False, "one of the two views is the plain image (the authors' agents/scr.py)")
    # The authors' kornia views: random-resized-crop (0.2-1), flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale
    # p 0.2, no blur. Its mean/std are not used: data.mean/std normalise every view.
    augment: AugmentConfig = _section(
        AugmentConfig, "augmentation of each view", preset="simclr", crop_scale=(0.2, 1.0), blur_p=0.0
    )


@dataclass(kw_only=True)
class ERConfig:
    """Experience replay, the cross-entropy baseline with the same memory and steps."""

    classifier: Literal["softmax", "ncm"] = key("softmax", "how ER is scored: its softmax head, or NCM as SCR")


@dataclass(kw_only=True)
class ContinualModelConfig:
    """The encoder, SCR's projection head (ER: a linear classifier over every class)."""

    encoder: str = key(
        "reduced_resnet18",
        "reduced_resnet18 (the SCR paper's), any timm name, or an exported encoder to start from (a path)",
        nonempty=True,
    )
    width: int = key(20, "reduced_resnet18 channels: width, 2x, 4x, 8x (20: the paper's 160-d features)", ge=1)
    cifar_stem: bool = key(True, "timm encoders: 3x3 stride-1 stem without max-pool (reduced_resnet18 has it)")
    head: Literal["mlp", "linear"] = key("mlp", "SCR's projection head (the authors': mlp)")
    feat_dim: int = key(128, "dimension of SCR's normalised projection", ge=1)
    sync_bn: bool = key(False, "batch-norm statistics over every rank's samples (ranks then equal one process)")
    channels_last: bool = key(False, "channels-last memory format")
    dtype: Literal["float32", "float64"] = key(
        "float32", "parameter and input dtype; float64 makes ranks-vs-one-process checks exact to ~1e-10"
    )


@dataclass(kw_only=True)
class ContinualOptimConfig:
    """The optimizer; constant learning rate, as the authors'."""

    name: Literal["sgd", "adamw", "lars"] = key("sgd", "sgd (the authors'), adamw or lars")
    lr: float = key(0.1, "the learning rate itself (not per 256 images: continual batches are small)", gt=0)
    momentum: float = key(0.0, "momentum of sgd and lars (the authors': none)", ge=0, lt=1)
    weight_decay: float = key(0.0, "L2 weight decay on every parameter (the authors': 0)", ge=0)


@dataclass(kw_only=True)
class ContinualTrainConfig:
    """Checkpoints, resume and evaluation."""

    checkpoint_every_steps: int | None = key(None, "also checkpoint every this many steps (task ends always)", ge=1)
    keep_last: int = key(2, "complete checkpoints kept per run", ge=1)
    resume: str | None = key(
        None,
        "auto: continue each run from its newest checkpoint (finished runs are kept); or one run's checkpoint",
        nonempty=True,
    )
    eval_batch_size: int = key(256, "images per forward pass when scoring", ge=1)
    log_every: int = key(10, "write metrics (loss, LR, views/s) every this many steps", ge=1)
    max_bad_steps: int = key(5, "stop after this many non-finite (skipped) steps in a row", ge=1)
    progress: bool = key(True, "progress bar on rank 0")
    preempt_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2"] = key(
        "SIGTERM", "signal that makes the run checkpoint and exit 3"
    )


@dataclass(kw_only=True)
class ContinualConfig:
    """Every run of one `supcon-scale continual` command: methods x seeds on one class-incremental stream."""

    out_dir: str = key("runs/continual/default", "summary, plots and one directory per method and seed", nonempty=True)
    methods: list[Literal["scr", "er"]] = _list_key(["scr", "er"], "methods to run, each with every seed")
    seeds: list[int] = _list_key([0], "seeds: class order, stream order, initial weights, augmentations, memory")
    precision: Literal["fp32", "bf16", "fp16"] = key("fp32", "autocast precision")
    data: ContinualDataConfig = _section(ContinualDataConfig, "the labelled images")
    stream: StreamConfig = _section(StreamConfig, "tasks and incoming batches")
    memory: MemoryConfig = _section(MemoryConfig, "the replay memory")
    scr: SCRConfig = _section(SCRConfig, "Supervised Contrastive Replay")
    er: ERConfig = _section(ERConfig, "the experience-replay baseline")
    model: ContinualModelConfig = _section(ContinualModelConfig, "the networks")
    optim: ContinualOptimConfig = _section(ContinualOptimConfig, "the optimizer")
    engine: EngineConfig = _section(EngineConfig, "how the ranks train together")
    train: ContinualTrainConfig = _section(ContinualTrainConfig, "checkpoints, resume, evaluation")
    log: LogConfig = _section(LogConfig, "log lines, TensorBoard and W&B beside each run's metrics.jsonl")

    def _check(self, path: str) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must name scr and/or er once each, got {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        order = self.stream.class_order
        if order is not None and len(set(map(str, order))) != len(order):
            raise ConfigError(f"stream.class_order names a class twice: {order}")
        if self.train.resume not in (None, "auto") and len(self.methods) * len(self.seeds) > 1:
            raise ConfigError(
                f"train.resume={self.train.resume} names one run's checkpoint, but methods x seeds makes "
                f"{len(self.methods) * len(self.seeds)} runs; use train.resume=auto"
            )
        # Evaluation runs each rank's share of the test set and of the memory through the plain model; a sharded
        # model would need the same forward passes on every rank.
        check_replicated(self.engine, "continual runs")
        check_deepspeed(self.engine, self.precision, self.optim.name)

    def to_dict(self) -> dict[str, Any]:
        return base.plain(dataclasses.asdict(self))


def check(cfg: ContinualConfig, world_size: int) -> None:
    """The rules against the run: the incoming batch splits evenly over the ranks."""
    if cfg.stream.batch_size % world_size:
        raise ConfigError(f"stream.batch_size={cfg.stream.batch_size} is not divisible by the world size {world_size}")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ContinualConfig:
    """Read `path` (following `base:` links), apply `a.b=value` overrides and return a checked ContinualConfig."""
    raw = base.read_yaml(path) if path is not None else {}
    return from_dict(base.apply_overrides(raw, overrides))


def from_dict(raw: Mapping[str, Any]) -> ContinualConfig:
    """The schema of supcon_scale/config.py's builder: unknown keys, types and ranges named by their dotted key."""
    return base.build(ContinualConfig, raw)


def save(cfg: ContinualConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
