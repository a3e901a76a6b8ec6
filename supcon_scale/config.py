"""Typed run configuration: YAML files with `base:` inheritance plus dotted `key=value` overrides.

Every section is a keyword-only dataclass. Loading rejects unknown keys (suggesting the nearest valid name),
wrong types and impossible values with a `ConfigError` (a ValueError) that names the dotted path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the dotted key."""


@dataclass(kw_only=True)
class AugmentConfig:
    """One view's augmentation; `preset` fills the defaults, every field may be overridden (FACTS.md section 3)."""

    preset: Literal["simclr", "randaugment", "jitter_randaugment", "stacked_randaugment", "autoaugment", "none"] = "simclr"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    randaugment_n: int = 2
    randaugment_m: int = 9
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self, path: str) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{path}.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ConfigError(f"{path}.{name} must be a probability in [0, 1], got {p}")
        if not 0 <= self.randaugment_m <= 30:
            raise ConfigError(f"{path}.randaugment_m must be a magnitude bin in [0, 30], got {self.randaugment_m}")


@dataclass(kw_only=True)
class DataConfig:
    root: str = "data/digits"
    backend: Literal["torchvision", "dali", "dali-cpu", "dali-gpu", "synthetic"] = "torchvision"
    global_batch_size: int = 256
    views: int = 2
    image_size: int = 224
    num_classes: int | None = None  # read from the folder when None
    workers: int = 4
    dali_threads: int = 4
    hw_decoder_load: float = 0.75
    drop_last: bool = True
    on_bad_file: Literal["skip", "fail"] = "skip"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, path: str) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"{path}.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.views < 1:
            raise ConfigError(f"{path}.views must be >= 1, got {self.views}")
        if self.image_size < 8:
            raise ConfigError(f"{path}.image_size must be >= 8, got {self.image_size}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ConfigError(f"{path}.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        self.augment.validate(f"{path}.augment")


@dataclass(kw_only=True)
class ModelConfig:
    encoder: str = "resnet50"
    head: Literal["mlp", "linear"] = "mlp"
    head_hidden_dim: int | None = None  # encoder width when None (2048 for ResNet-50)
    feat_dim: int = 128
    sync_bn: bool = False
    channels_last: bool = True
    activation_checkpointing: bool = False
    cifar_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32 px images

    def validate(self, path: str) -> None:
        if self.feat_dim < 1:
            raise ConfigError(f"{path}.feat_dim must be >= 1, got {self.feat_dim}")


@dataclass(kw_only=True)
class LossConfig:
    name: Literal["supcon", "simclr", "genscl", "cross_entropy"] = "supcon"
    temperature: float = 0.1
    variant: Literal["out", "in"] = "out"
    contrast: Literal["all", "one"] = "all"
    scale: Literal["none", "temperature", "base_temperature"] = "none"
    base_temperature: float = 0.07
    impl: Literal["dense", "tiled", "auto"] = "auto"

    def validate(self, path: str) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"{path}.temperature must be > 0, got {self.temperature}")
        if not self.base_temperature > 0:
            raise ConfigError(f"{path}.base_temperature must be > 0, got {self.base_temperature}")


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"
    base_lr: float = 0.4  # per 256 images of global batch: lr = base_lr * global_batch / 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    trust_coeff: float = 0.001
    exclude_bn_bias: bool = True  # excluded tensors get neither weight decay nor LARS adaptation
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr_fraction: float = 0.0

    def validate(self, path: str) -> None:
        if not self.base_lr > 0:
            raise ConfigError(f"{path}.base_lr must be > 0, got {self.base_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 100
    max_steps: int | None = None  # stop early after this many optimizer steps (whole run)
    warmup_epochs: float = 10.0
    log_every: int = 10
    checkpoint_every_steps: int | None = None  # in addition to the end of each epoch
    keep_last: int = 3
    resume: str | None = None  # a checkpoint directory, or "auto" for the newest complete one in out_dir
    max_bad_steps: int = 5
    compile: bool = False
    knn_every_epochs: int | None = None
    preempt_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2"] = "SIGTERM"
    progress: bool = True

    def validate(self, path: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{path}.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{path}.max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"{path}.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.keep_last < 1:
            raise ConfigError(f"{path}.keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class EngineConfig:
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    zero_stage: int = 1
    deepspeed_config: str | None = None  # optional JSON merged under the generated one

    def validate(self, path: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass(kw_only=True)
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5


@dataclass(kw_only=True)
class KDConfig:
    teacher: str | None = None  # timm name (with `checkpoint`) or a linear-eval checkpoint directory
    checkpoint: str | None = None
    temperature: float = 1.0
    alpha: float = 1.0  # inf: teacher labels only


@dataclass(kw_only=True)
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def validate(self, world_size: int | None = None) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if world_size is not None and self.data.global_batch_size % world_size:
            raise ConfigError(
                f"data.global_batch_size={self.data.global_batch_size} is not divisible by the world size "
                f"{world_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the dict survives YAML/JSON and `torch.load(weights_only=True)`."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (following `base:` links), apply `a.b=value` overrides and return a validated RunConfig."""
    raw = _read_yaml(Path(path), seen=()) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    cfg.validate()
    return cfg


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: `base:` inheritance forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


# Keys of older configs (and of the SupContrast reference scripts) -> their current name.
RENAMED = {
    "loss.temp": "loss.temperature",
    "data.batch_size": "data.global_batch_size",
    "optim.lr": "optim.base_lr",
    "optim.learning_rate": "optim.base_lr",
    "train.save_freq": "train.checkpoint_every_steps",
    "train.save_every": "train.checkpoint_every_steps",
    "train.warm_epochs": "train.warmup_epochs",
}


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields and dotted in RENAMED:
            raise ConfigError(f"config key {dotted} was renamed to {RENAMED[dotted]} (an older config?)")
        if key not in fields:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {(path + '.' if path else '') + near[0]}?)" if near else ""
            raise ConfigError(f"unknown config key {dotted}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, str) and value.lower() in ("inf", "+inf", ".inf"):
            return math.inf
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema annotation this loader does not know
        raise AssertionError(f"unsupported annotation {tp} at {path}")
    raise ConfigError(f"{path} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
