"""Typed run configuration: YAML files with `base:` inheritance plus dotted `key=value` overrides.

Every key is declared once, beside its default, a one-line description and its valid range (`key(...)`), and
`schema()` lists them all (for `supcon-scale config show` and the tests). Loading rejects unknown keys (suggesting
the nearest valid name), wrong types, non-finite and out-of-range numbers with a `ConfigError` (a ValueError) whose
one-line message names the dotted key. Rules that tie keys of different sections together, or a key to the run's
world size and device, live in `check_run`, which the trainer calls once before it writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from supcon_scale.yamlload import Loader

# The ImageNet channel statistics (RGB, 0..1 scale) every training and evaluation view is normalised with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few KB; anything larger is not a config
MAX_BASE_DEPTH = 32  # files in one `base:` chain
INT64_MAX = 2**63 - 1


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the dotted key."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded one-line repr: a message never formats a huge (or alias-expanded) value in full."""
    try:
        return _repr.repr(value)
    except ValueError:  # an int beyond str()'s digit limit
        return f"<{type(value).__name__} too large to print>"


def _name(value: Any) -> str:
    """A key or path as written when it is short and printable, else its bounded repr (messages stay one line)."""
    text = str(value) if isinstance(value, (str, Path)) else _short(value)
    return text if text.isprintable() and len(text) <= 200 else _short(text)


# ---------------------------------------------------------------------------------------------------------------
# Declaring keys


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


@dataclass(frozen=True)
class Range:
    """The valid values of a number: optional bounds, and whether +inf is meaningful (otherwise it must be finite)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    inf: bool = False

    def __str__(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + lo[1:]
        elif hi:
            text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        else:
            text = "finite"
        return f"{text}, or inf" if self.inf else text

    def problem(self, x: float) -> str | None:
        """Why `x` is not valid, or None."""
        if math.isnan(x) or (math.isinf(x) and not (self.inf and x > 0)):
            if self.inf:
                return f"must be {self}"
            return f"must be a finite number ({self})" if str(self) != "finite" else "must be finite"
        ok = (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )
        return None if ok else f"must be {self}"


PROBABILITY = Range(ge=0, le=1)
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
COUNT = Range(ge=1)


def key(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    inf: bool = False,
    items: tuple[Range, ...] | None = None,
    nonempty: bool = False,
) -> Any:
    """A config key: its default, one-line `help`, and its range (bounds apply to every item of a tuple key).

    `items` gives one Range per item of a tuple key instead; `nonempty` refuses "" for a string key.
    """
    bounds: Range | tuple[Range, ...] | None = items
    if bounds is None and any(b is not None for b in (ge, gt, le, lt)):
        bounds = Range(ge=ge, gt=gt, le=le, lt=lt, inf=inf)
    metadata = {"help": help, "range": bounds, "nonempty": nonempty}
    if isinstance(default, dict):  # a mapping key: each config gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# The schema


@dataclass(kw_only=True)
class AugmentConfig:
    """One training view's augmentation (the google-research/supcon scripts' recipes; SimCLR's colour distortion).

    `preset` picks which operations run, the other keys give their values.
    """

    preset: Literal["simclr", "randaugment", "jitter_randaugment", "stacked_randaugment", "autoaugment", "none"] = key(
        "simclr", "operations after crop and flip, in order (supcon_scale/data/spec.py PRESET_STAGES)"
    )
    crop_scale: tuple[float, float] = key(
        (0.08, 1.0), "random-resized-crop area as a fraction of the image, [min, max]", gt=0, le=1
    )
    flip_p: float = key(0.5, "probability of a horizontal flip", ge=0, le=1)
    jitter: tuple[float, float, float, float] = key(
        (0.4, 0.4, 0.4, 0.1),
        "colour-jitter strengths: brightness, contrast, saturation, hue",
        items=(NON_NEGATIVE, NON_NEGATIVE, NON_NEGATIVE, Range(ge=0, le=0.5)),
    )
    jitter_p: float = key(0.8, "probability of colour jitter", ge=0, le=1)
    grayscale_p: float = key(0.2, "probability of converting the view to grey", ge=0, le=1)
    blur_p: float = key(0.5, "probability of a Gaussian blur", ge=0, le=1)
    randaugment_n: int = key(2, "RandAugment operations per view", ge=1)
    randaugment_m: int = key(9, "RandAugment magnitude, a bin of 0..30", ge=0, le=30)
    mean: tuple[float, float, float] = key(IMAGENET_MEAN, "per-channel normalisation mean (RGB, 0..1)", ge=0, le=1)
    std: tuple[float, float, float] = key(IMAGENET_STD, "per-channel normalisation std (RGB, 0..1)", gt=0)

    def _check(self, path: str) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{path}.crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")


@dataclass(kw_only=True)
class DataConfig:
    """The training images and their input pipeline."""

    root: str = key("data/digits", "image folder: train/<class>/* (and val/<class>/* for kNN)", nonempty=True)
    format: Literal["folder", "shards", "cifar"] = key(
        "folder", "how data.root stores the images: folder (class folders), shards (tar + index.json), cifar"
    )
    manifest: str | None = key(
        None, "bad-file scan manifest read and written at start-up; null: out_dir/data_manifest.tsv", nonempty=True
    )
    backend: Literal["torchvision", "dali", "dali-cpu", "dali-gpu", "synthetic"] = key(
        "torchvision", "input pipeline: torchvision (Pillow), dali (on the GPU when there is one), dali-cpu, ..."
    )
    global_batch_size: int = key(256, "images per optimizer step over all ranks (each gives `views` views)", ge=1)
    views: int = key(
        2,
        "augmented views of each image (at most 64: each view is another forward pass; the paper uses 2)",
        ge=1,
        le=64,
    )
    image_size: int = key(
        224, "side of the square training crop, in pixels (at most 4096: one fp32 view is then 192 MiB)", ge=8, le=4096
    )
    num_classes: int | None = key(None, "number of classes; read from the folder when null", ge=1)
    workers: int = key(
        4, "torchvision DataLoader workers per rank (0: in the training process; at most 256 processes)", ge=0, le=256
    )
    dali_threads: int = key(4, "DALI CPU threads per rank", ge=1)
    hw_decoder_load: float = key(0.75, "share of JPEG decoding on the GPU's hardware decoder (DALI)", ge=0, le=1)
    drop_last: bool = key(True, "drop each epoch's last incomplete global batch")
    on_bad_file: Literal["skip", "fail"] = key("skip", "an image that cannot be decoded: skip it (listed) or fail")
    eval_crop: Literal["resize_crop", "identity"] = key(
        "resize_crop", "evaluation view: short side to image_size/0.875 then centre crop, or the image as stored"
    )
    augment: AugmentConfig = field(
        default_factory=AugmentConfig, metadata={"help": "augmentation of each training view"}
    )


@dataclass(kw_only=True)
class ModelConfig:
    """The encoder and its projection head."""

    encoder: str = key("resnet50", "timm name of the encoder (resnet50, resnet101, resnet200, ...)", nonempty=True)
    head: Literal["mlp", "linear"] = key("mlp", "projection head: mlp (one hidden layer) or linear")
    head_hidden_dim: int | None = key(None, "hidden width of the mlp head; the encoder's width when null", ge=1)
    feat_dim: int = key(
        128, "dimension of the normalised embedding the loss sees (at most 65536; the paper uses 128)", ge=1, le=65536
    )
    sync_bn: bool = key(False, "batch-norm statistics over the global batch (every rank)")
    channels_last: bool = key(True, "channels-last memory format")
    activation_checkpointing: bool = key(False, "recompute activations in backward: less memory, more compute")
    cifar_stem: bool = key(False, "3x3 stride-1 stem without max-pool, for 32 px images (ResNets only)")
    kwargs: dict[str, Any] = key(
        {},
        "arguments to timm.create_model (img_size, patch_size, depth, drop_path_rate, ...); data.image_size "
        "is the img_size of a fixed-size family (ViT, Swin) unless given here",
    )
    head_hidden_layers: int = key(1, "hidden layers of the mlp head (SimCLR's 2048-2048-128 head has 2)", ge=1)
    head_batch_norm: bool = key(False, "batch norm after each hidden mlp layer, which then has no bias (SimCLR)")
    head_bias: bool = key(True, "bias in the head's last layer (the official projection head has none)")
    normalize_encoder_output: bool = key(
        False, "L2-normalise the pooled encoder output before the head or classifier (official normalize_embedding)"
    )
    init_from: str | None = key(
        None, "local timm checkpoint or .safetensors file the encoder starts from (no hub download)", nonempty=True
    )

    def _check(self, path: str) -> None:
        for name, why in RESERVED_MODEL_KWARGS.items():
            if name in self.kwargs:
                raise ConfigError(f"{path}.kwargs.{name} cannot be set: {why}")


# timm.create_model arguments the toolkit sets itself (models.create_encoder), with the reason.
RESERVED_MODEL_KWARGS = {
    "num_classes": "the encoder is built without a classifier (num_classes=0); the head is model.head",
    "pretrained": "nothing is downloaded; start from a local file with model.init_from",
    "pretrained_cfg": "nothing is downloaded; start from a local file with model.init_from",
    "pretrained_cfg_overlay": "nothing is downloaded; start from a local file with model.init_from",
    "checkpoint_path": "start from a local file with model.init_from",
    "features_only": "the encoder returns pooled features",
}


@dataclass(kw_only=True)
class LossConfig:
    """The training objective (SupCon paper eq. 2 and 3)."""

    name: Literal["supcon", "simclr", "genscl", "cross_entropy"] = key(
        "supcon", "supcon (labels), simclr (no labels), genscl (label vectors), cross_entropy (baseline)"
    )
    temperature: float = key(0.1, "temperature tau of the contrastive softmax", gt=0)
    variant: Literal["out", "in"] = key(
        "out", "positives averaged outside the log (L_out, eq. 2) or inside (L_in, eq. 3)"
    )
    contrast: Literal["all", "one"] = key("all", "anchors: every view (all) or the first view only (one)")
    scale: Literal["none", "temperature", "base_temperature"] = key(
        "none", "loss multiplier: none, tau (official release) or tau / base_temperature (SupContrast)"
    )
    base_temperature: float = key(0.07, "reference temperature of scale=base_temperature", gt=0)
    label_smoothing: float = key(0.0, "label smoothing of loss.name=cross_entropy", ge=0, lt=1)
    impl: Literal["dense", "tiled", "auto"] = key(
        "auto", "dense similarity matrix, tiled blocks (less memory), or auto"
    )
    denominator_mode: Literal["all", "one_positive", "only_negatives"] = key(
        "all", "positives in the softmax denominator: all, only the numerator's one, or none (official release)"
    )
    positives_cap: int | None = key(
        None, "most positive views per anchor besides its own image's (a multiple of the views); null: no cap", ge=0
    )


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer and learning-rate schedule."""

    name: Literal["lars", "sgd", "adamw", "lamb"] = key(
        "lars", "lars (the paper), sgd with momentum, adamw or lamb (timm's; the ViT recipes)"
    )
    base_lr: float = key(0.4, "learning rate per 256 images: lr = base_lr * global_batch_size / 256", gt=0)
    weight_decay: float = key(1e-4, "L2 weight decay", ge=0)
    momentum: float = key(0.9, "momentum of lars and sgd (adamw and lamb use betas)", ge=0, lt=1)
    betas: tuple[float, float] = key(
        (0.9, 0.999), "adamw and lamb moment coefficients (DeiT: 0.9, 0.999; MoCo v3 ViT: 0.9, 0.95)", ge=0, lt=1
    )
    eps: float | None = key(None, "adamw and lamb epsilon; null: the optimizer's default (1e-8, lamb 1e-6)", gt=0)
    layer_decay: float | None = key(
        None, "layer-wise LR decay: block i of n gets lr x layer_decay ** (n - i) (BEiT); null: none", gt=0, le=1
    )
    nesterov: bool = key(False, "Nesterov momentum for name=sgd (the official cross-entropy recipes)")
    trust_coeff: float = key(0.001, "LARS trust coefficient eta", gt=0)
    exclude_bn_bias: bool = key(
        True,
        "1-D tensors (norms, biases) and timm's no_weight_decay() names (pos_embed, cls_token) get neither "
        "weight decay nor LARS adaptation",
    )
    schedule: Literal["cosine", "constant"] = key("cosine", "after the warm-up: cosine decay or constant")
    final_lr_fraction: float = key(0.0, "learning rate at the end of the cosine, as a fraction of the peak", ge=0, le=1)


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: length, warm-up, logging, checkpoints, resume and failure handling."""

    epochs: int = key(100, "epochs of the run", ge=1)
    max_steps: int | None = key(None, "stop after this many optimizer steps (whole run); null: epochs decide", ge=1)
    warmup_epochs: float = key(10.0, "linear learning-rate warm-up in epochs (fractions allowed), <= epochs", ge=0)
    log_every: int = key(10, "write metrics every this many steps", ge=1)
    checkpoint_every_steps: int | None = key(None, "also checkpoint every this many steps (epoch ends always)", ge=1)
    keep_last: int = key(3, "complete checkpoints kept in out_dir", ge=1)
    resume: str | None = key(
        None, "checkpoint directory to continue from, or auto: the newest in out_dir", nonempty=True
    )
    max_bad_steps: int = key(5, "stop after this many non-finite steps in a row", ge=1)
    compile: bool = key(False, "torch.compile the wrapped forward")
    knn_every_epochs: int | None = key(None, "kNN accuracy on data.root/val every this many epochs; null: never", ge=1)
    preempt_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2"] = key(
        "SIGTERM", "signal that makes the run checkpoint and exit 3"
    )
    progress: bool = key(True, "progress on rank 0: a bar on a terminal, plain lines otherwise (false: neither)")
    profile_steps: str | None = key(
        None, "torch.profiler trace of steps A-B (e.g. 20-25) into out_dir/profile; null: no trace", nonempty=True
    )
    allow_changes: str | None = key(
        None, "on resume, keys (or sections) that may differ from the checkpoint's config: KEY,KEY,...", nonempty=True
    )

    def _check(self, path: str) -> None:
        allowed_changes(self.allow_changes, f"{path}.allow_changes")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"{path}.warmup_epochs must be in [0, epochs={self.epochs}], got {_num(self.warmup_epochs)}: "
                f"it cannot exceed {path}.epochs"
            )
        if self.profile_steps is not None:
            profile_range(self.profile_steps, f"{path}.profile_steps")


@dataclass(kw_only=True)
class EngineConfig:
    """How the ranks train together."""

    name: Literal["ddp", "fsdp", "deepspeed"] = key("ddp", "ddp, fsdp (FSDP2) or deepspeed")
    backend: Literal["auto", "nccl", "gloo"] = key("auto", "torch.distributed backend; auto: nccl on GPUs, else gloo")
    zero_stage: int = key(1, "DeepSpeed ZeRO stage (engine.name=deepspeed; 3 is refused)", ge=0, le=3)
    deepspeed_config: str | None = key(None, "JSON file merged under the generated DeepSpeed config", nonempty=True)


@dataclass(kw_only=True)
class MixConfig:
    """Mixup and CutMix of each view into label vectors (GenSCL, loss.name=genscl)."""

    mixup_alpha: float = key(0.0, "Beta(alpha, alpha) of Mixup; 0: off", ge=0)
    cutmix_alpha: float = key(0.0, "Beta(alpha, alpha) of CutMix; 0: off", ge=0)
    prob: float = key(1.0, "probability that a view is mixed", ge=0, le=1)
    switch_prob: float = key(0.5, "probability of CutMix rather than Mixup when both are on", ge=0, le=1)


@dataclass(kw_only=True)
class KDConfig:
    """A frozen teacher's predictions as a second set of label vectors (GenSCL)."""

    teacher: str | None = key(None, "timm name (with checkpoint) or a cross-entropy run directory", nonempty=True)
    checkpoint: str | None = key(None, "weights file (state dict) of a timm teacher", nonempty=True)
    temperature: float = key(1.0, "softmax temperature of the teacher's predictions", gt=0)
    alpha: float = key(1.0, "weight of the teacher's label vectors; inf: the teacher's labels only", ge=0, inf=True)


def allowed_changes(text: str | None, path: str = "train.allow_changes") -> list[str]:
    """The dotted keys and sections of a `train.allow_changes` list; an unknown one is a ConfigError naming it."""
    if text is None:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {k.key for k in schema()}
    known |= {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{path}: unknown config key {_short(name)}{hint}")
    return names


def profile_range(text: str, path: str = "train.profile_steps") -> tuple[int, int]:
    """The steps (first, last) of an "A-B" range, 1 <= A <= B."""
    match = re.fullmatch(r"\s*(\d{1,12})\s*-\s*(\d{1,12})\s*", text)
    if match is None or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"{path} must look like A-B with 1 <= A <= B (steps, e.g. 20-25), got {_short(text)}")
    return int(match.group(1)), int(match.group(2))


@dataclass(kw_only=True)
class LogConfig:
    """What a run reports besides metrics.jsonl, and where."""

    plain: bool = key(False, "plain log lines on rank 0 even on a terminal (always when stderr is not a terminal)")
    timing: bool = key(True, "per log window, the time shares of data wait, forward+backward and optimizer step")
    tensorboard: bool = key(
        False, "the metrics also as TensorBoard scalars in out_dir/tensorboard (extra: tensorboard)"
    )
    wandb: bool = key(False, "the metrics also to Weights & Biases, run files in out_dir/wandb (extra: wandb)")
    wandb_project: str = key("supcon_scale", "W&B project name", nonempty=True)
    wandb_mode: Literal["offline", "online"] = key("offline", "W&B mode: offline (upload later: wandb sync) or online")


@dataclass(kw_only=True)
class RunConfig:
    """One training run."""

    out_dir: str = key("runs/default", "run directory: config, metrics, checkpoints, exported encoder", nonempty=True)
    seed: int = key(0, "seed of the initial weights, the data order and the augmentations", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = key("fp32", "autocast precision (fp16 with loss scaling)")
    device: Literal["auto", "cuda", "cpu"] = key(
        "auto",
        "cuda, cpu or auto (cuda when CUDA works); cuda, or GPUs named in CUDA_VISIBLE_DEVICES, without CUDA: error",
    )
    tf32: bool = key(True, "TF32 tensor cores for fp32 matmuls and convolutions on the GPU (bf16/fp16 unaffected)")
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "the training images and their input pipeline"}
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the encoder and its projection head"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "the training objective"})
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "the optimizer and learning-rate schedule"}
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training loop"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "how the ranks train together"})
    mix: MixConfig = field(default_factory=MixConfig, metadata={"help": "Mixup/CutMix label vectors (GenSCL)"})
    kd: KDConfig = field(default_factory=KDConfig, metadata={"help": "teacher label vectors (GenSCL)"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "log lines, time shares and metric sinks"})

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


def plain(obj: Any) -> Any:
    """Tuples to lists, so the dict survives YAML/JSON and `torch.load(weights_only=True)`."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


class Key(NamedTuple):
    """One key of the schema: dotted name, annotation, default, one-line description and valid range."""

    key: str
    type: Any  # the annotation: int, float, str, bool, tuple[float, float], Literal[...], int | None, ...
    default: Any
    help: str
    range: Range | tuple[Range, ...] | None  # None: any value of the type (a Literal lists its choices itself)

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    @property
    def range_text(self) -> str:
        """The valid values in words, for `config show`: "> 0", "in [0, 1]", "one of fp32, bf16, fp16", ""."""
        if typing.get_origin(self.type) is Literal:
            return "one of " + ", ".join(map(str, typing.get_args(self.type)))
        if isinstance(self.range, tuple):
            return "; ".join(f"[{i}] {r}" for i, r in enumerate(self.range))
        return str(self.range) if self.range is not None else ""


def schema(cls: type = RunConfig, prefix: str = "") -> list[Key]:
    """Every key of `cls` (RunConfig: the whole config) in declaration order, sections expanded to their keys."""
    hints = typing.get_type_hints(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += schema(tp, dotted + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(Key(dotted, tp, default, f.metadata["help"], f.metadata["range"]))
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "str"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    return tp.__name__


# ---------------------------------------------------------------------------------------------------------------
# Rules between keys and against the run


def check_run(cfg: RunConfig, world_size: int | None = None, device_type: str | None = None) -> None:
    """Every key's type and range again, then the rules between sections and against the run.

    The trainer calls it once, before it writes anything, and then the engine rules (`engines.check`, which this
    layer cannot import); `world_size` and `device_type` ("cuda", "cpu") are the run's, and the rules that need them
    are skipped when they are None.
    """
    _build(RunConfig, cfg.to_dict(), "")  # a RunConfig built in Python gets the loader's checks too
    if world_size is not None and cfg.data.global_batch_size % world_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the world size {world_size}"
        )
    if device_type is not None and cfg.data.backend == "dali-gpu" and device_type != "cuda":
        raise ConfigError("data.backend=dali-gpu needs a CUDA GPU but this process has none (use dali or dali-cpu)")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (following `base:` links), apply `a.b=value` overrides and return a validated RunConfig."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from nested plain values, with every key's type and range checked."""
    return build(RunConfig, raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file `path` merged over its `base:` files (each relative to the file naming it).

    `path` may name a packaged recipe (`imagenet/supcon_resnet50`); a file at `path` wins.
    """
    from supcon_scale import recipes

    return _read_chain(recipes.find(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each `a.b=value` of `overrides` in `raw` (in place; returned), to be read by `build`.

    A value is taken as typed for a string key (`out_dir=runs/exp #3` keeps the `#3`) and read as YAML for the
    other keys (numbers, booleans, lists, null), once `build` knows the key's type.
    """
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"override {_short(item)} must look like key.sub=value")
        _set_dotted(raw, name, _Override(value))
    return raw


def build(cls: type, raw: Any, path: str = "") -> Any:
    """The keyword-only dataclass `cls` (a schema of `key(...)` fields) from `raw`, every key checked.

    Unknown keys, wrong types and values outside a key's range raise a ConfigError naming the dotted key (under
    the prefix `path`); a section's `_check(path)` then checks the rules between its own keys.
    """
    return _build(cls, raw, path)


class _Override:
    """The text of a `key=value` override, parsed once the key's type is known."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text.strip()

    def __repr__(self) -> str:
        return repr(self.text)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> plain values, or a one-line ConfigError naming `where` (a file or an override key)."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        raise ConfigError(f"{where}: invalid YAML ({exc.problem or exc.context}{mark})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({str(exc).splitlines()[0] if str(exc) else 'error'})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's, e.g. an int of 5,000 digits
        raise ConfigError(f"{where}: invalid YAML value ({_short(str(exc))})") from None


def _read_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config {_name(path)}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {_name(path)}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {_name(path)}: not UTF-8 text (byte {exc.start})") from None


def _read_chain(path: Path) -> dict[str, Any]:
    """The file at `path` merged over its `base:` files (each relative to the file that names it)."""
    layers: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while True:
        shown = _name(path)
        if len(layers) == MAX_BASE_DEPTH:
            raise ConfigError(f"config {shown}: the `base:` chain is longer than {MAX_BASE_DEPTH} files")
        if not path.is_file():
            raise ConfigError(f"config file not found: {shown}")
        real = path.resolve()
        if real in seen:
            raise ConfigError(f"config {shown}: `base:` inheritance forms a cycle")
        seen.add(real)
        data = _parse_yaml(_read_file(path), f"config {shown}")
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"config {shown}: top level must be a mapping, got {type(data).__name__}")
        base = data.pop("base", None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip() or "\0" in base:
            raise ConfigError(f"config {shown}: base must be the path of another YAML file, got {_short(base)}")
        path = path.parent / base
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        _deep_merge(merged, layer)
    return merged


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict[str, Any], name: str, value: Any) -> None:
    node = raw
    parts = name.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {_name(name)}: {_name(part)} is not a section")
        node = child
    old = node.get(parts[-1])
    if isinstance(value, _Override) and isinstance(old, dict):
        # `loss={variant: in}` over a recipe's loss section: merged into it, the section's other keys kept
        parsed = _parse_yaml(value.text, f"override {_name(name)}")
        if isinstance(parsed, dict):
            _deep_merge(old, parsed)
            return
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
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__} {_short(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{path}.{_name(name)}" if path else _name(name)
        if name not in fields:
            if dotted in RENAMED:
                raise ConfigError(f"config key {dotted} was renamed to {RENAMED[dotted]} (an older config?)")
            near = difflib.get_close_matches(str(name), sorted(fields), n=1)
            hint = f" (did you mean {(path + '.' if path else '') + near[0]}?)" if near else ""
            raise ConfigError(f"unknown config key {_name(dotted)}{hint}")
        value = _coerce(hints[name], value, dotted)
        _check_range(value, fields[name].metadata, dotted)
        kwargs[name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "_check"):
        obj._check(path)
    return obj


_NULLS = ("", "~", "null", "Null", "NULL")
# What YAML 1.1 reads as a string but is a float for a float key: 1e-4 (PyYAML needs a dot), inf, nan.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        if origin in (typing.Union, types.UnionType) and type(None) in args and value.text in _NULLS:
            return None
        plain = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
        if all(a is str or typing.get_origin(a) is Literal for a in plain):
            value = value.text  # as typed: a path may hold `#`, `: ` or look like a number
        else:
            value = _parse_yaml(value.text, f"override {path}")
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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_short(value)} matches none of {tp}")
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {_short(value)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__} {_short(value)}")
        return {_mapping_key(k, path): _plain_value(v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__} {_short(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {_short(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(re.sub(r"^([-+]?)\.(?=[a-zA-Z])", r"\1", value.strip()))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(
                    f"{path} must be a finite number, got an integer of {len(str(value))} digits"
                ) from None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT64_MAX:
                raise ConfigError(f"{path} must fit in 64 bits, got {_short(value)}")
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema annotation this loader does not know
        raise AssertionError(f"unsupported annotation {tp} at {path}")
    raise ConfigError(f"{path} must be {tp.__name__}, got {type(value).__name__} {_short(value)}")


def _mapping_key(name: Any, path: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{path}: key {_short(name)} must be a Python identifier (a keyword argument name)")
    return name


def _plain_value(value: Any, path: str) -> Any:
    """A value of a mapping key (model.kwargs): YAML scalars, lists and mappings of them; an override is YAML."""
    if isinstance(value, _Override):
        value = _parse_yaml(value.text, f"override {path}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be finite, got {value}")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{path} must not contain a NUL character")
    if isinstance(value, Mapping):
        return {_mapping_key(k, path): _plain_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{path} must be a number, string, boolean, null, list or mapping; got {_short(value)}")


def _check_range(value: Any, meta: Mapping[str, Any], path: str) -> None:
    """`value` (already of the key's type) against the key's declared range; None passes (an optional key)."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(f"{path} must not contain a NUL character")
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{path} must not be empty")
    bounds = meta.get("range")
    if bounds is None or value is None or dataclasses.is_dataclass(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path} must be finite, got {value}")
        return
    items = value if isinstance(value, (tuple, list)) else (value,)
    ranges = bounds if isinstance(bounds, tuple) else (bounds,) * len(items)
    for i, (x, rng) in enumerate(zip(items, ranges, strict=True)):
        problem = rng.problem(x)
        if problem:
            where = f"{path}[{i}]" if isinstance(value, (tuple, list)) else path
            raise ConfigError(f"{where} {problem}, got {_num(x) if math.isfinite(x) else x}")


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
