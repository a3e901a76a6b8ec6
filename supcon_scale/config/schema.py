"""The schema of a training run: one typed dataclass per section, each key declared once with `key(...)`, and
`schema()`, which lists every key (for `supcon-scale config show` and the tests)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from supcon_scale.config.keys import NON_NEGATIVE, ConfigError, Range, _num, _short, key

# The ImageNet channel statistics (RGB, 0..1 scale) every training and evaluation view is normalised with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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
    small_crop_scale: tuple[float, float] = key(
        (0.05, 0.14), "random-resized-crop area of the views smaller than data.image_size (multi-crop)", gt=0, le=1
    )
    mean: tuple[float, float, float] = key(IMAGENET_MEAN, "per-channel normalisation mean (RGB, 0..1)", ge=0, le=1)
    std: tuple[float, float, float] = key(IMAGENET_STD, "per-channel normalisation std (RGB, 0..1)", gt=0)

    def _check(self, path: str) -> None:
        for name in ("crop_scale", "small_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{path}.{name} must satisfy 0 < min <= max <= 1, got {[lo, hi]}")


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
    view_sizes: list[int] | None = key(
        None,
        "crop side of each view, large first, e.g. [224, 224, 96, 96, 96, 96, 96, 96] (multi-crop; the first is "
        "data.image_size); null: all image_size",
        ge=8,
        le=4096,
    )
    sampler: Literal["random", "m_per_class"] = key(
        "random", "each epoch's order: a random permutation, or m_per_class batches (data.m_per_class per class)"
    )
    m_per_class: int = key(4, "images of each class in a global batch when data.sampler=m_per_class", ge=1)
    on_bad_file: Literal["skip", "fail"] = key("skip", "an image that cannot be decoded: skip it (listed) or fail")
    eval_crop: Literal["resize_crop", "identity"] = key(
        "resize_crop", "evaluation view: short side to image_size/0.875 then centre crop, or the image as stored"
    )
    augment: AugmentConfig = field(
        default_factory=AugmentConfig, metadata={"help": "augmentation of each training view"}
    )

    def _check(self, path: str) -> None:
        check_view_sizes(self.view_sizes, self.views, self.image_size, f"{path}.view_sizes")


def check_view_sizes(sizes: list[int] | None, views: int, image_size: int, path: str = "data.view_sizes") -> None:
    """Multi-crop (SwAV, Caron et al. 2020, sec. 3.2): one size per view, large views first, the largest being
    `data.image_size` (the size the encoder is built, checked and evaluated at; the small views are the extra ones)."""
    if sizes is None:
        return
    if len(sizes) != views:
        raise ConfigError(f"{path} has {len(sizes)} sizes but data.views={views}: give one size per view")
    if sizes != sorted(sizes, reverse=True):
        raise ConfigError(
            f"{path} must be non-increasing (large views first, e.g. {sorted(sizes, reverse=True)}), got {sizes}"
        )
    if sizes[0] != image_size:
        raise ConfigError(
            f"{path}: the largest view ({sizes[0]}) must equal data.image_size={image_size}, the size the encoder "
            "is built and evaluated at; set data.image_size to it"
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
    momentum: float | None = key(
        None,
        "momentum encoder for the queue's keys, m from this to 1 on a half-cosine (MoCo v3); null: none",
        ge=0,
        le=1,
    )
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
    queue_size: int = key(
        0,
        "labelled queue: key views of earlier steps added to the contrast set (a multiple of data.views, "
        "queue_size * model.feat_dim * 4 bytes <= 1 GiB; supcon and simclr); 0: off",
        ge=0,
    )
    ce_weight: float = key(
        0.0, "weight of cross-entropy on a linear classifier over the encoder features (SupCon + CE); 0: off", ge=0
    )


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer and learning-rate schedule."""

    name: Literal["lars", "sgd", "adamw", "lamb"] = key(
        "lars", "lars (the paper), sgd with momentum, adamw or lamb (timm's; the ViT recipes)"
    )
    base_lr: float = key(0.4, "learning rate per 256 images: lr = base_lr * global_batch_size / 256", gt=0)
    scale_lr: bool = key(
        True, "scale base_lr by global_batch_size / 256 (false: base_lr is the learning rate itself, as finetune --lr)"
    )
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
    ema_decay: float | None = key(
        None, "EMA of the model's weights (timm ModelEmaV3), exported as encoder_ema.safetensors; null: off", ge=0, lt=1
    )
    online_probe: bool = key(False, "a linear classifier on the detached encoder features, trained beside the loss")
    online_probe_lr: float = key(0.1, "learning rate of the online probe (SGD, momentum 0.9, no weight decay)", gt=0)
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
