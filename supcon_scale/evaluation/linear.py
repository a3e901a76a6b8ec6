"""Linear evaluation (the paper's stage 2): a linear classifier on a frozen encoder, scored at the final epoch.

Three named protocols (docs/EVALUATION.md):

- `official`: the google-research/supcon stage 2, in its ImageNet form (TF RMSProp, i.e. timm's `RMSpropTF`; LR
  scaled by the stage-1 batch; 12 warm-up epochs, then x0.97 every half epoch; 90 epochs; wd 1e-6; label smoothing
  0.05) or its CIFAR form (momentum SGD 2.5 per 256, x0.2 after epochs 60/75/90, 100 epochs, no wd); both train
  on the stage-1 augmented stream with batch norm in train mode whose running statistics do not move, and feed
  the classifier the L2-normalised features when the run set `model.normalize_encoder_output`.
- `hobbitlong`: HobbitLong/SupContrast `main_linear.py` (SGD 0.1, x0.2 after epochs 60/75/90, crop 0.2-1 + flip,
  batch norm in eval mode).
- `fast`: not a published recipe; L-BFGS on standardised cached features, for demos and monitors.

With a process group up each rank takes a slice of every global batch and the head's gradients are summed over
ranks. The reported accuracy is the final epoch's, never the best on the evaluation split.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import arguments, config, distributed
from supcon_scale.evaluation.features import (
    cache_key,
    default_device,
    extract_features,
    freeze,
    load_features,
    save_features,
)
from supcon_scale.files import write_replacing, write_text

PresetName = Literal["official", "official_imagenet", "official_cifar", "hobbitlong", "fast", "paper", "sgd"]


@dataclass(frozen=True)
class Preset:
    """One linear-probe recipe. `base_lr` is per 256 images unless `scale_lr` is False (then absolute)."""

    optimizer: Literal["rmsprop", "sgd", "lbfgs"]
    epochs: int
    base_lr: float
    weight_decay: float
    label_smoothing: float
    schedule: Literal["exponential", "piecewise", "epoch_steps", "cosine", "none"]
    standardize: bool
    batch_size: int = 256
    warmup_epochs: float = 0.0
    decay_rate: float = 1.0
    decay_every_epochs: float = 1.0  # exponential: one decay per this many epochs (staircase)
    boundaries: tuple[int, ...] = ()  # piecewise / epoch_steps: epochs after which the LR is x decay_rate
    stream: Literal["cached", "stage1", "crop_flip"] = "cached"  # what the head trains on
    bn: Literal["eval", "train_frozen"] = "eval"  # encoder batch norm while the head trains
    stage1_batch: bool = False  # batch (and LR scaling) = the pre-training run's global batch
    scale_lr: bool = True
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1e-3


PRESETS: dict[str, Preset] = {
    # google-research/supcon supcon_imagenet_resnet50.sh stage 2 (hparams_flags.py defaults for the unset flags:
    # stage_2_warmup_epochs=12, stage_2_rmsprop_epsilon=0.001; utils.build_optimizer: decay 0.9, momentum 0.9).
    "official_imagenet": Preset(
        "rmsprop",
        90,
        0.05,
        1e-6,
        0.05,
        "exponential",
        standardize=False,
        warmup_epochs=12.0,
        decay_rate=0.97,
        decay_every_epochs=0.5,
        stream="stage1",
        bn="train_frozen",
        stage1_batch=True,
    ),  # fmt: skip
    # supcon_cifar10_resnet50.sh stage 2: MOMENTUM 2.5 per 256, PIECEWISE_LINEAR x0.2 at 60/75/90, no warm-up, no wd.
    "official_cifar": Preset(
        "sgd",
        100,
        2.5,
        0.0,
        0.0,
        "piecewise",
        standardize=False,
        decay_rate=0.2,
        boundaries=(60, 75, 90),
        stream="stage1",
        bn="train_frozen",
        stage1_batch=True,
    ),  # fmt: skip
    # HobbitLong/SupContrast main_linear.py: batch 256, SGD 0.1 (absolute), momentum 0.9, x0.2 after epochs 60/75/90.
    "hobbitlong": Preset(
        "sgd",
        100,
        0.1,
        0.0,
        0.0,
        "epoch_steps",
        standardize=False,
        decay_rate=0.2,
        boundaries=(60, 75, 90),
        stream="crop_flip",
        scale_lr=False,
    ),  # fmt: skip
    # Not a published recipe: full-batch L-BFGS on standardised cached features, L2 picked on a held-out 20% of the
    # train split (never on val). Converges in seconds on small data; use it for demos and monitors.
    "fast": Preset("lbfgs", 100, 1.0, 0.0, 0.0, "none", standardize=True),
    # Older names: `paper` is the official protocol; `sgd` is SGD 0.1 per 256 with a cosine on cached features.
    "sgd": Preset("sgd", 100, 0.1, 0.0, 0.0, "cosine", standardize=False),
}
ALIASES = {"official": "official", "paper": "official"}  # resolved per checkpoint: ImageNet or CIFAR form
FAST_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
PROTOCOL_NAMES = sorted([*PRESETS, *ALIASES])


class LinearProbe(nn.Module):
    """Frozen encoder -> [L2-normalise] -> (features - mean) / std -> linear layer; `classes[i]` names output i."""

    def __init__(
        self,
        encoder: nn.Module,
        fc: nn.Linear,
        mean: torch.Tensor,
        std: torch.Tensor,
        classes: list[str],
        normalize: bool = False,
    ):
        super().__init__()
        self.encoder = freeze(encoder)
        self.fc = fc
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.classes = list(classes)
        self.normalize = normalize  # the official classifier sees h / |h| when the run normalised its embedding

    def head(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=-1) if self.normalize else features.float()
        return self.fc((f - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()  # batch-norm statistics stay frozen whatever the caller does
        return self


def save_probe(probe: LinearProbe, path: str | Path) -> Path:
    """The head alone (weight, bias, mean, std) as safetensors, with the class names in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": probe.fc.weight, "bias": probe.fc.bias, "mean": probe.mean, "std": probe.std}
    meta = {"classes": json.dumps(probe.classes), "normalize": str(int(probe.normalize))}
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # through the one writer: `--save-probe DIR` (a directory) is one line naming it, a planted link is replaced
    return write_replacing(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def load_probe(encoder: nn.Module, path: str | Path) -> LinearProbe:
    """A `LinearProbe` from an encoder and a head written by `save_probe`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--probe: no linear head at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    fc = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    fc.weight.data.copy_(t["weight"])
    fc.bias.data.copy_(t["bias"])
    classes = json.loads(meta.get("classes", "[]"))
    return LinearProbe(encoder, fc, t["mean"], t["std"], classes, normalize=meta.get("normalize") == "1")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits (k clipped to the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean()) if len(labels) else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------------
# What the pre-training run says about its evaluation


def run_config(path: str | Path) -> config.RunConfig | None:
    """The pre-training run's resolved config beside an exported encoder or in a checkpoint directory, if any.

    Looks for `meta.json` (a checkpoint directory) or `config.yaml` (a run directory) at `path` or its parent.
    """
    path = Path(path)
    for folder in (path, path.parent) if path.is_dir() else (path.parent, path.parent.parent):
        meta, yaml_path = folder / "meta.json", folder / "config.yaml"
        try:
            if meta.is_file():
                raw = json.loads(meta.read_text())
                raw = raw.get("config") if isinstance(raw, dict) else None  # a list or a number: no config
                if isinstance(raw, dict) and raw:
                    return config.from_dict(raw)
            if yaml_path.is_file():
                return config.load(yaml_path)
        except (config.ConfigError, json.JSONDecodeError):
            return None  # an older schema: evaluate with the defaults
    return None


def checkpoint_image_size(path: str | Path, cifar_stem: bool) -> int:
    """The input size the export records; else the pre-training run's config; else 32 for a CIFAR stem, 224."""
    from supcon_scale.export import ENCODER_FILE, input_size, read_metadata

    file = Path(path) / ENCODER_FILE if Path(path).is_dir() else Path(path)
    recorded = input_size(read_metadata(file)) if file.is_file() else None
    if recorded is not None:
        return recorded
    cfg = run_config(path)
    if cfg is not None:
        return cfg.data.image_size
    return 32 if cifar_stem else 224


def resolve_protocol(name: str, stage1: config.RunConfig | None) -> tuple[str, Preset]:
    """The preset `name` names; `official` (and its older name `paper`) picks the CIFAR form for a CIFAR-stem run."""
    if name in ALIASES:
        cifar = stage1 is not None and (stage1.model.cifar_stem or stage1.data.eval_crop == "identity")
        name = "official_cifar" if cifar else "official_imagenet"
    if name not in PRESETS:
        raise ValueError(f"--protocol/--preset: unknown protocol {name!r}; choose from {', '.join(PROTOCOL_NAMES)}")
    return name, PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------
# Optimisers and schedules


def make_optimizer(preset: Preset, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """TF's RMSProp (timm's RMSpropTF: accumulator from 1, eps inside the root, LR inside momentum) or SGD.

    Weight decay is the L2 gradient wd * w on every head tensor, bias included: the official stage 2 adds
    wd * sum(|w|^2 / 2) over the classifier's variables (use_bias_weight_decay=True).
    """
    if preset.optimizer == "rmsprop":
        from timm.optim import RMSpropTF

        return RMSpropTF(
            params, lr=lr, alpha=preset.rmsprop_decay, eps=preset.rmsprop_eps, momentum=preset.momentum,
            weight_decay=preset.weight_decay, lr_in_momentum=True,
        )  # fmt: skip
    # TF's MomentumOptimizer is accum = m * accum + g, w -= lr * accum: torch's SGD without dampening
    return torch.optim.SGD(params, lr=lr, momentum=preset.momentum, weight_decay=preset.weight_decay)


def lr_at(preset: Preset, peak: float, step: int, steps_per_epoch: float, total_steps: int) -> float:
    """The learning rate of `step` (0-based), as utils.build_learning_rate_schedule (official) or main_linear.py.

    `steps_per_epoch` is images / batch, a float as in the official launcher.
    """
    warmup = int(preset.warmup_epochs * steps_per_epoch)
    if step < warmup:  # maybe_add_warmup_to_lr: target * counter / warmup_steps, from 0
        return peak * step / warmup
    t = step - warmup  # the decay counts from the warm-up's end
    if preset.schedule == "exponential":  # tf.train.exponential_decay(staircase=True)
        return peak * preset.decay_rate ** math.floor(t / (steps_per_epoch * preset.decay_every_epochs))
    if preset.schedule == "piecewise":  # tf piecewise_constant: the next value once t > boundary
        return peak * preset.decay_rate ** sum(t > int(steps_per_epoch * b) for b in preset.boundaries)
    if preset.schedule == "epoch_steps":  # main_linear.py adjust_learning_rate: per epoch, after each boundary
        epoch = int(t // steps_per_epoch) + 1
        return peak * preset.decay_rate ** sum(epoch > b for b in preset.boundaries)
    if preset.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * t / max(total_steps - warmup, 1)))
    return peak


def _sync_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks: each rank's loss is its slice's sum divided by the *global* batch size."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(distributed.all_reduce_sum(p.grad))


def _update(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor) -> float:
    """One step on this rank's share of the batch; returns the batch loss summed over ranks."""
    opt.zero_grad(set_to_none=False)
    loss.backward()
    _sync_grads(params)
    opt.step()
    return float(distributed.all_reduce_sum(loss.detach()))


def _zero_head(dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    fc = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(fc.weight), nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------------------------------------------------------
# Heads on cached features


def _fit_minibatch(
    preset: Preset, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, batch_size: int, lr: float,
    seed: int,
) -> tuple[nn.Linear, dict[str, Any]]:  # fmt: skip
    """SGD on cached features; every rank holds all rows and computes its slice of each global batch."""
    rank, world = distributed.world()
    torch.manual_seed(seed)
    fc = _zero_head(x.shape[1], num_classes, x.device)
    params = list(fc.parameters())
    opt = make_optimizer(preset, params, lr)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            batch = perm[s * batch_size : (s + 1) * batch_size]
            mine = batch.tensor_split(world)[rank]
            for g in opt.param_groups:
                g["lr"] = lr_at(preset, lr, step, steps_per_epoch, epochs * steps_per_epoch)
            logits = fc(x[mine])
            loss = F.cross_entropy(logits, y[mine], label_smoothing=preset.label_smoothing, reduction="sum")
            loss_sum += _update(opt, params, loss / len(batch))
            step += 1
    return fc, {"epochs": epochs, "final_train_loss": loss_sum / steps_per_epoch, "steps": step}


def _lbfgs(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, init: nn.Linear | None = None
) -> tuple[nn.Linear, tuple[int, int]]:
    """Multinomial logistic regression, full batch: mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised); returns
    the head and (iterations, function evaluations): each iteration is one full-batch pass, an epoch here."""
    fc = _zero_head(x.shape[1], num_classes, x.device)
    if init is not None:  # warm start along the regularisation path: far fewer iterations per fit
        fc.load_state_dict(init.state_dict())
    # max_eval well above max_iter: the iteration count (`--epochs`) is the limit, not torch's default evaluation
    # budget of 1.25 x max_iter, which the line search's extra evaluations can reach an iteration or more earlier.
    opt = torch.optim.LBFGS(
        fc.parameters(), lr=1.0, max_iter=max_iter, max_eval=max_iter * 25, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(fc(x), y) + 0.5 * l2 * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    return fc, (int(state.get("n_iter", 0)), int(state.get("func_evals", 0)))


def _fit_lbfgs(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, max_iter: int, seed: int
) -> tuple[nn.Linear, dict[str, Any]]:
    """Pick L2 on a stratified 20% of the train rows, then refit on all of them. Deterministic, so ranks agree."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    labels = y.cpu().numpy()
    stratify = labels if np.bincount(labels).min() >= 2 else None
    fit_idx, hold_idx = train_test_split(idx, test_size=0.2, stratify=stratify, random_state=seed)
    fit_idx, hold_idx = torch.as_tensor(fit_idx, device=x.device), torch.as_tensor(hold_idx, device=x.device)
    scores, fits, prev = {}, {}, None
    for l2 in sorted(FAST_L2_GRID, reverse=True):  # strongest first, each fit warm-starts the next
        prev, _ = _lbfgs(x[fit_idx], y[fit_idx], num_classes, l2, max_iter, init=prev)
        fits[l2] = prev
        with torch.no_grad():
            scores[l2] = float((prev(x[hold_idx]).argmax(1) == y[hold_idx]).float().mean())
    best = max(FAST_L2_GRID, key=lambda l2: (scores[l2], l2))  # ties go to the stronger regulariser
    fc, (iterations, evals) = _lbfgs(x, y, num_classes, best, max_iter, init=fits[best])
    # `epochs` is the iterations of the final fit (at most `--epochs`; fewer when it converged), not the function
    # evaluations, which count the first evaluation and the line search's (`--epochs 5` was reported as 6)
    info = {"epochs": iterations, "max_epochs": max_iter, "function_evaluations": evals}
    return fc, {**info, "l2": best, "l2_holdout_top1": {str(k): v for k, v in scores.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Heads on a stream of augmented images through the encoder


def stream_transform(preset: Preset, stage1: config.RunConfig | None, image_size: int):
    """One training view: the stage-1 augmentation (`stage1`), or main_linear.py's crop 0.2-1 + flip."""
    from torchvision.transforms import v2

    from supcon_scale.data.spec import spec_from_config
    from supcon_scale.data.torchvision import view_transform

    aug = stage1.data.augment if stage1 is not None else config.AugmentConfig()
    if preset.stream == "stage1":
        return view_transform(spec_from_config(aug, image_size))
    return v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std)),
    ])  # fmt: skip


class _AugmentedFolder(torch.utils.data.Dataset):
    def __init__(self, index, transform):
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.index.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.index.labels[i]


@contextlib.contextmanager
def bn_train_frozen(encoder: nn.Module, global_bn: bool) -> Iterator[None]:
    """Batch norm normalises with batch statistics but its running averages stay exactly as they were.

    The official stage 2 runs the encoder in training mode and drops its batch-norm update ops
    (stage_2_update_encoder_batch_norm=False). With `global_bn` and several ranks the statistics are the global
    batch's, as the official global batch norm computes them.
    """
    from supcon_scale.models import FrozenBatchNormStats, GlobalBatchNorm

    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    classes = [m.__class__ for m in norms]
    was_training = encoder.training
    if global_bn and distributed.world()[1] > 1:
        for m in norms:
            m.__class__ = GlobalBatchNorm
    encoder.train()
    try:
        with FrozenBatchNormStats(encoder):
            yield
    finally:
        for m, cls in zip(norms, classes, strict=True):
            m.__class__ = cls
        encoder.train(was_training)


def stream_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` global batches from one shuffled pass after another, crossing epoch ends as tf.data.repeat does."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.zeros(0, dtype=torch.long)
    for _ in range(steps):
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=gen)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def _fit_stream(
    preset: Preset, encoder: nn.Module, index, transform, num_classes: int, dim: int, epochs: int, batch_size: int,
    lr: float, seed: int, device: torch.device, num_workers: int, normalize: bool, global_bn: bool,
) -> tuple[nn.Linear, dict[str, Any]]:  # fmt: skip
    """Head trained on freshly augmented train images through the frozen encoder (the official stage 2)."""
    rank, world = distributed.world()
    torch.manual_seed(distributed.rank_seed(seed, rank))  # augmentation differs per rank, the head starts equal
    fc = _zero_head(dim, num_classes, device)
    params = list(fc.parameters())
    opt = make_optimizer(preset, params, lr)
    dataset = _AugmentedFolder(index, transform)
    n = len(dataset)
    steps_per_epoch = n / batch_size
    total = max(1, int(epochs * steps_per_epoch))
    batches = [b.tensor_split(world)[rank].tolist() for b in stream_batches(n, batch_size, total, seed)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    bn = bn_train_frozen(encoder, global_bn) if preset.bn == "train_frozen" else contextlib.nullcontext()
    losses: list[float] = []
    with bn:
        for step, (images, labels) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = lr_at(preset, lr, step, steps_per_epoch, total)
            with torch.no_grad():
                feats = encoder(images.to(device)).float()
            if normalize:
                feats = F.normalize(feats, dim=-1)
            logits = fc(feats)
            loss = F.cross_entropy(logits, labels.to(device), label_smoothing=preset.label_smoothing, reduction="sum")
            losses.append(_update(opt, params, loss / batch_size))
    last_epoch = losses[-max(1, math.ceil(steps_per_epoch)) :]
    return fc, {"epochs": epochs, "final_train_loss": sum(last_epoch) / len(last_epoch), "steps": total}


# ---------------------------------------------------------------------------------------------------------------
# The entry points


def fit_linear_probe(
    encoder: nn.Module,
    data_root: str | Path,
    *,
    image_size: int,
    preset: PresetName = "official",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str | torch.device | None = None,
    augment: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    train_split: str = "train",
    val_split: str = "val",
    stage1: config.RunConfig | None = None,
    keep_predictions: bool = False,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Train a linear head on `data_root/train_split` and score it on `data_root/val_split` (final epoch).

    `stage1` is the pre-training run's config (`run_config`): its augmentation, batch size, normalisation and
    evaluation crop; without it the defaults of config.py stand in. `keep_predictions` adds `val_correct`, whether
    each val image (in folder order) was right, for paired comparisons of models (`stats.mcnemar`).
    """
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.data.folder import index_folder
    from supcon_scale.evaluation.splits import check_splits

    form, cfg = resolve_protocol(preset, stage1)
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if augment and cfg.optimizer == "lbfgs":
        raise ValueError("--augment: the 'fast' protocol trains on cached features; use official or hobbitlong")
    stage1_batch = stage1.data.global_batch_size if stage1 is not None else 256
    default_batch = stage1_batch if cfg.stage1_batch else cfg.batch_size
    cfg = replace(cfg, epochs=epochs or cfg.epochs, batch_size=batch_size or default_batch)
    if augment and cfg.stream == "cached":
        cfg = replace(cfg, stream="crop_flip")
    device = default_device(device)
    root = Path(data_root)
    check_splits(root, "--data", train_split, val_split)  # both there, the same class folders: else labels shift
    train_index, val_index = index_folder(root / train_split), index_folder(root / val_split)
    num_classes = len(train_index.classes)
    encoder = freeze(encoder).to(device)
    data_cfg = stage1.data if stage1 is not None else config.DataConfig()
    view = {"mean": data_cfg.augment.mean, "std": data_cfg.augment.std, "crop": data_cfg.eval_crop}
    normalize = cfg.stream == "stage1" and stage1 is not None and stage1.model.normalize_encoder_output

    timing: dict[str, float] = {}
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, index in (("train", train_index), ("val", val_index)):
        if split == "train" and cfg.stream != "cached" and not cfg.standardize:
            continue  # the stream encodes train images every step
        key = cache_key(encoder, index.paths, image_size) + json.dumps(view, default=list)
        cached = load_features(Path(cache_dir) / f"features_{split}.safetensors", key) if cache_dir else None
        if cached is None:
            dataset = EvalDataset(root, "", image_size, index=index, **view)
            f, y, t = extract_features(
                encoder, dataset, batch_size=min(cfg.batch_size, 1024), device=device, num_workers=num_workers
            )
            timing[f"extract_{split}_s"] = t["seconds"]
            timing[f"extract_{split}_images_per_s"] = t["images_per_s"]
            if cache_dir and distributed.world()[0] == 0:
                save_features(Path(cache_dir) / f"features_{split}.safetensors", f, y, key)
            cached = (f, y)
        feats[split] = cached
    val_x, val_y = (t.to(device) for t in feats["val"])
    dim = val_x.shape[1]
    if cfg.standardize:
        tx = feats["train"][0].to(device)
        mean, std = tx.mean(0), tx.std(0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(dim, device=device), torch.ones(dim, device=device)

    _, world = distributed.world()
    lr_value = lr if lr is not None else cfg.base_lr * (cfg.batch_size / 256 if cfg.scale_lr else 1.0)
    start = time.perf_counter()
    if cfg.stream != "cached":
        transform = stream_transform(cfg, stage1, image_size)
        global_bn = stage1 is not None and stage1.model.sync_bn
        fc, info = _fit_stream(
            cfg, encoder, train_index, transform, num_classes, dim, cfg.epochs, cfg.batch_size, lr_value, seed,
            device, num_workers, normalize, global_bn,
        )  # fmt: skip
    else:
        x, y = feats["train"][0].to(device), feats["train"][1].to(device)
        x = (x - mean) / std
        if cfg.optimizer == "lbfgs":
            fc, info = _fit_lbfgs(x, y, num_classes, cfg.epochs, seed)
            lr_value = 1.0
        else:
            fc, info = _fit_minibatch(cfg, x, y, num_classes, cfg.epochs, cfg.batch_size, lr_value, seed)
    timing["train_s"] = time.perf_counter() - start
    probe = LinearProbe(encoder, fc, mean, std, train_index.classes, normalize=normalize).to(device)
    with torch.no_grad():
        val_logits = probe.head(val_x)
        val_acc = topk_accuracy(val_logits, val_y)
        train_acc = (
            topk_accuracy(probe.head(feats["train"][0].to(device)), feats["train"][1].to(device))
            if "train" in feats
            else {}
        )
    result = {
        **val_acc,
        "correct": round(val_acc["top1"] * len(val_index)),
        "preset": preset,
        "protocol": form,
        "epochs": info.pop("epochs"),
        "augment": cfg.stream != "cached",
        "stream": cfg.stream,
        "batch_norm": cfg.bn,
        "normalize_features": normalize,
        "optimizer": cfg.optimizer,
        "lr": lr_value,
        "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing,
        "stage1_config": stage1 is not None,
        "eval_crop": view["crop"],
        "train_top1": train_acc.get("top1"),
        "num_train": len(train_index),
        "num_val": len(val_index),
        "num_classes": num_classes,
        "feature_dim": dim,
        "image_size": image_size,
        "world_size": world,
        "device": str(device),
        **info,
        **timing,
    }
    if keep_predictions:
        result["val_correct"] = (val_logits.argmax(1) == val_y).tolist()
    return probe, result


def linear_eval(
    encoder: nn.Module, data_root: str | Path, *, image_size: int, preset: PresetName = "official", **kwargs: Any
) -> dict[str, Any]:
    """`fit_linear_probe` without the probe: {"top1", "top5" (fractions, final epoch), "epochs", "preset", ...}."""
    return fit_linear_probe(encoder, data_root, image_size=image_size, preset=preset, **kwargs)[1]


def print_results(title: str, rows: dict[str, dict[str, Any]]) -> None:
    """A rich table of top-1 (with its n and 95% Wilson interval) and top-5 per named result (rank 0 only)."""
    from rich.console import Console
    from rich.table import Table

    from supcon_scale.evaluation.stats import format_accuracy

    table = Table(title=title)
    for col in ("model", "top-1 [95% CI] (n)", "top-5", "protocol", "epochs", "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in rows.items():
        top1 = format_accuracy(r["top1"], r["num_val"])
        table.add_row(
            name, top1, f"{100 * r['top5']:.2f}", str(r.get("protocol", "")), str(r.get("epochs", "")),
            f"{r.get('train_s', 0):.1f}",
        )  # fmt: skip
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """`tools/linear_eval.py` / `supcon-scale linear-eval`: exit 0, or 2 with a one-line reason on bad input."""
    args = arguments.linear_eval().parse_args(argv)
    from supcon_scale.evaluation.features import check_args
    from supcon_scale.export import encoder_from_export

    check_args(args)
    from supcon_scale.evaluation.splits import check_splits

    try:  # before the encoder loads: a missing or mismatched split, named by its flag
        check_splits(args.data, "--data")
    except ValueError as exc:
        print(f"linear_eval: error: {exc}", file=sys.stderr)
        return 2
    ctx = distributed.init(seed=args.seed)
    try:
        encoder, meta = encoder_from_export(args.checkpoint)
        stage1 = run_config(args.checkpoint)
        size = args.image_size or checkpoint_image_size(args.checkpoint, meta.get("cifar_stem") == "1")
        probe, result = fit_linear_probe(
            encoder, args.data, image_size=size, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, device=args.device or ctx.device, augment=args.augment, num_workers=args.workers,
            seed=args.seed, cache_dir=args.cache_dir, stage1=stage1,
        )  # fmt: skip
    except ValueError as exc:
        print(f"linear_eval: error: {exc}", file=sys.stderr)
        distributed.teardown()
        return 2
    result["checkpoint"] = str(args.checkpoint)
    result["encoder"] = meta.get("encoder")
    if ctx.is_main:
        print_results("Linear evaluation (final epoch)", {meta.get("encoder", "encoder"): result})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text(args.json, json.dumps(result, indent=2))
        if args.save_probe:
            save_probe(probe, args.save_probe)
    distributed.teardown()
    return 0
