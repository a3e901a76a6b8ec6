"""Linear evaluation (the paper's stage 2): a linear classifier on a frozen encoder, scored at the final epoch.

The encoder stays in eval mode (batch-norm statistics frozen; docs/EVALUATION.md). Without augmentation the
features are extracted once (sharded over ranks, all-gathered) and the head trains on the cached matrix; with
augmentation every epoch runs the frozen encoder on freshly augmented train images. With a process group up each
rank takes a slice of every global batch and the head's gradients are summed over ranks, so the result equals one
process on the global batch. The reported accuracy is the final epoch's, never the best on the evaluation split
(docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import distributed
from supcon_scale.evaluation.features import cache_key, default_device, extract_features, freeze, load_features, save_features

PresetName = Literal["paper", "sgd", "fast"]


@dataclass(frozen=True)
class Preset:
    """One linear-probe recipe; `base_lr` is per 256 images and scaled by the batch size."""

    optimizer: Literal["rmsprop", "sgd", "lbfgs"]
    epochs: int
    base_lr: float
    weight_decay: float
    label_smoothing: float
    schedule: Literal["exp_half_epoch", "cosine", "none"]
    standardize: bool
    batch_size: int = 256


PRESETS: dict[str, Preset] = {
    # The paper's stage 2 (Khosla et al. 2020, appendix; google-research/supcon): RMSProp 0.05 per 256, x0.97 every half epoch, wd 1e-6, smoothing 0.05.
    "paper": Preset("rmsprop", 90, 0.05, 1e-6, 0.05, "exp_half_epoch", standardize=False),
    # The PyTorch reference's linear stage (HobbitLong/SupContrast main_linear.py): SGD 0.1, momentum 0.9, cosine.
    "sgd": Preset("sgd", 100, 0.1, 0.0, 0.0, "cosine", standardize=False),
    # Not a published recipe: full-batch L-BFGS on standardised cached features, L2 picked on a held-out 20% of the
    # train split (never on val). Converges in seconds on small data; use it for demos and monitors.
    "fast": Preset("lbfgs", 100, 1.0, 0.0, 0.0, "none", standardize=True),
}
FAST_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class LinearProbe(nn.Module):
    """Frozen encoder -> (features - mean) / std -> linear layer; `classes[i]` names output i."""

    def __init__(self, encoder: nn.Module, fc: nn.Linear, mean: torch.Tensor, std: torch.Tensor, classes: list[str]):
        super().__init__()
        self.encoder = freeze(encoder)
        self.fc = fc
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.classes = list(classes)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc((features.float() - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # batch-norm statistics stay frozen whatever the caller does
        return self


def save_probe(probe: LinearProbe, path: str | Path) -> Path:
    """The head alone (weight, bias, mean, std) as safetensors, with the class names in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": probe.fc.weight, "bias": probe.fc.bias, "mean": probe.mean, "std": probe.std}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={"classes": json.dumps(probe.classes)})
    return path


def load_probe(encoder: nn.Module, path: str | Path) -> LinearProbe:
    """A `LinearProbe` from an encoder and a head written by `save_probe`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--probe: no linear head at {path}")
    with safe_open(str(path), framework="pt") as f:
        classes = json.loads((f.metadata() or {}).get("classes", "[]"))
    t = load_file(str(path))
    fc = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    fc.weight.data.copy_(t["weight"])
    fc.bias.data.copy_(t["bias"])
    return LinearProbe(encoder, fc, t["mean"], t["std"], classes)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits (k clipped to the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean()) if len(labels) else float("nan")
    return out


def _make_optimizer(preset: Preset, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if preset.optimizer == "rmsprop":
        # TF-style RMSProp as in TPU ImageNet recipes (decay 0.9, momentum 0.9); the paper gives only LR/decay/wd.
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9, eps=1e-3, weight_decay=preset.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=preset.weight_decay)


def _lr_at(preset: Preset, lr: float, step: int, steps_per_epoch: int, total_steps: int) -> float:
    if preset.schedule == "exp_half_epoch":  # staircase: x0.97 after every half epoch
        return lr * 0.97 ** math.floor(step / max(steps_per_epoch / 2, 1))
    if preset.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))
    return lr


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


def _fit_minibatch(
    preset: Preset, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, batch_size: int, lr: float, seed: int,
) -> tuple[nn.Linear, dict[str, Any]]:
    """RMSProp/SGD on cached features; every rank holds all rows and computes its slice of each global batch."""
    rank, world = distributed.world()
    torch.manual_seed(seed)
    fc = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(fc.weight), nn.init.zeros_(fc.bias)
    params = list(fc.parameters())
    opt = _make_optimizer(preset, params, lr)
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
                g["lr"] = _lr_at(preset, lr, step, steps_per_epoch, epochs * steps_per_epoch)
            logits = fc(x[mine])
            loss = F.cross_entropy(logits, y[mine], label_smoothing=preset.label_smoothing, reduction="sum") / len(batch)
            loss_sum += _update(opt, params, loss)
            step += 1
    return fc, {"epochs": epochs, "final_train_loss": loss_sum / steps_per_epoch, "steps": step}


def _lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, init: nn.Linear | None = None) -> tuple[nn.Linear, int]:
    """Multinomial logistic regression, full batch: mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised)."""
    fc = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(fc.weight), nn.init.zeros_(fc.bias)
    if init is not None:  # warm start along the regularisation path: far fewer iterations per fit
        fc.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(
        fc.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-10,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(fc(x), y) + 0.5 * l2 * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return fc, int(opt.state[opt._params[0]].get("func_evals", 0))


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, max_iter: int, seed: int) -> tuple[nn.Linear, dict[str, Any]]:
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
    fc, evals = _lbfgs(x, y, num_classes, best, max_iter, init=fits[best])
    return fc, {"epochs": evals, "l2": best, "l2_holdout_top1": {str(k): v for k, v in scores.items()}}


def _train_transform(image_size: int):
    from torchvision.transforms import v2

    from supcon_scale.data.eval import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


class _AugmentedFolder(torch.utils.data.Dataset):
    def __init__(self, index, image_size: int):
        self.index = index
        self.transform = _train_transform(image_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.index.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.index.labels[i]


def _fit_augmented(
    preset: Preset, encoder: nn.Module, index, image_size: int, num_classes: int, dim: int, epochs: int, batch_size: int,
    lr: float, seed: int, device: torch.device, num_workers: int, mean: torch.Tensor, std: torch.Tensor,
) -> tuple[nn.Linear, dict[str, Any]]:
    """Head trained on freshly augmented train images through the frozen encoder (slower, the paper's full protocol)."""
    rank, world = distributed.world()
    torch.manual_seed(distributed.rank_seed(seed, rank))  # augmentation differs per rank, the head starts equal
    fc = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(fc.weight), nn.init.zeros_(fc.bias)
    params = list(fc.parameters())
    opt = _make_optimizer(preset, params, lr)
    dataset = _AugmentedFolder(index, image_size)
    n = len(dataset)
    steps_per_epoch = n // batch_size if n >= batch_size else 1  # drop the last partial global batch
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        batches = [perm[s * batch_size : (s + 1) * batch_size].tensor_split(world)[rank].tolist() for s in range(steps_per_epoch)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
        loss_sum = 0.0
        for images, labels in loader:
            for g in opt.param_groups:
                g["lr"] = _lr_at(preset, lr, step, steps_per_epoch, epochs * steps_per_epoch)
            with torch.no_grad():
                feats = encoder(images.to(device)).float()
            logits = fc((feats - mean) / std)
            total = min(batch_size, n)
            loss = F.cross_entropy(logits, labels.to(device), label_smoothing=preset.label_smoothing, reduction="sum") / total
            loss_sum += _update(opt, params, loss)
            step += 1
    return fc, {"epochs": epochs, "final_train_loss": loss_sum / steps_per_epoch, "steps": step}


def fit_linear_probe(
    encoder: nn.Module,
    data_root: str | Path,
    *,
    image_size: int,
    preset: PresetName = "paper",
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
) -> tuple[LinearProbe, dict[str, Any]]:
    """Train a linear head on `data_root/train_split` and score it on `data_root/val_split` (final epoch)."""
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.data.folder import index_folder

    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if augment and cfg.optimizer == "lbfgs":
        raise ValueError("--augment: the 'fast' preset trains on cached features; use --preset paper or sgd with augmentation")
    cfg = replace(cfg, epochs=epochs or cfg.epochs, batch_size=batch_size or cfg.batch_size)
    device = default_device(device)
    root = Path(data_root)
    train_index, val_index = index_folder(root / train_split), index_folder(root / val_split)
    if train_index.classes != val_index.classes:
        raise ValueError(f"--data: class folders of {root / train_split} and {root / val_split} differ")
    num_classes = len(train_index.classes)
    encoder = freeze(encoder).to(device)

    timing: dict[str, float] = {}
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, index in (("train", train_index), ("val", val_index)):
        if split == "train" and augment and cfg.standardize is False:
            continue  # not needed: the augmented path encodes train images every epoch
        key = cache_key(encoder, index.paths, image_size)
        cached = load_features(Path(cache_dir) / f"features_{split}.safetensors", key) if cache_dir else None
        if cached is None:
            f, y, t = extract_features(encoder, EvalDataset(root, "", image_size, index=index), batch_size=cfg.batch_size, device=device, num_workers=num_workers)
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
    lr_value = lr if lr is not None else cfg.base_lr * cfg.batch_size / 256
    start = time.perf_counter()
    if augment:
        fc, info = _fit_augmented(cfg, encoder, train_index, image_size, num_classes, dim, cfg.epochs, cfg.batch_size, lr_value, seed, device, num_workers, mean, std)
    else:
        x, y = feats["train"][0].to(device), feats["train"][1].to(device)
        x = (x - mean) / std
        if cfg.optimizer == "lbfgs":
            fc, info = _fit_lbfgs(x, y, num_classes, cfg.epochs, seed)
            lr_value = 1.0
        else:
            fc, info = _fit_minibatch(cfg, x, y, num_classes, cfg.epochs, cfg.batch_size, lr_value, seed)
    timing["train_s"] = time.perf_counter() - start
    probe = LinearProbe(encoder, fc, mean, std, train_index.classes).to(device)
    with torch.no_grad():
        val_acc = topk_accuracy(probe.head(val_x), val_y)
        train_acc = topk_accuracy(probe.head(feats["train"][0].to(device)), feats["train"][1].to(device)) if "train" in feats else {}
    result = {
        **val_acc,
        "preset": preset,
        "epochs": info.pop("epochs"),
        "augment": augment,
        "optimizer": cfg.optimizer,
        "lr": lr_value,
        "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing,
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
    return probe, result


def linear_eval(encoder: nn.Module, data_root: str | Path, *, image_size: int, preset: PresetName = "paper", **kwargs: Any) -> dict[str, Any]:
    """`fit_linear_probe` without the probe: {"top1", "top5" (fractions, final epoch), "epochs", "preset", ...}."""
    return fit_linear_probe(encoder, data_root, image_size=image_size, preset=preset, **kwargs)[1]


def checkpoint_image_size(path: str | Path, cifar_stem: bool) -> int:
    """The pre-training image size from a checkpoint directory's meta.json; 32 for a CIFAR stem, else 224."""
    path = Path(path)
    for meta in (path / "meta.json", path.parent / "meta.json"):
        if meta.is_file():
            size = json.loads(meta.read_text()).get("config", {}).get("data", {}).get("image_size")
            if size:
                return int(size)
    return 32 if cifar_stem else 224


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linear_eval", description="Linear evaluation of a frozen encoder (final-epoch top-1/top-5).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or encoder.safetensors")
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/ class folders")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="paper (RMSProp, 90 ep), sgd, or fast (L-BFGS)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: preset base x batch/256)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    p.add_argument("--augment", action="store_true", help="train the head on augmented images (no feature cache)")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="keep extracted features here and reuse them")
    p.add_argument("--save-probe", default=None, help="write the trained linear head (safetensors) for imagenet_c")
    p.add_argument("--json", default=None, help="write the results as JSON")
    return p


def print_results(title: str, rows: dict[str, dict[str, Any]]) -> None:
    """A rich table of top-1/top-5 per named result (rank 0 only)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "top-1", "top-5", "preset", "epochs", "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in rows.items():
        table.add_row(name, f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}", str(r.get("preset", "")), str(r.get("epochs", "")), f"{r.get('train_s', 0):.1f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """`tools/linear_eval.py` / `supcon-scale linear-eval`: exit 0, or 2 with a one-line reason on bad input."""
    args = build_parser().parse_args(argv)
    from supcon_scale.checkpoint import load_encoder

    ctx = distributed.init(seed=args.seed)
    try:
        encoder, meta = load_encoder(args.checkpoint)
        size = args.image_size or checkpoint_image_size(args.checkpoint, meta.get("cifar_stem") == "1")
        probe, result = fit_linear_probe(
            encoder, args.data, image_size=size, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, device=args.device or ctx.device, augment=args.augment, num_workers=args.workers, seed=args.seed,
            cache_dir=args.cache_dir,
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
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.save_probe:
            save_probe(probe, args.save_probe)
    distributed.teardown()
    return 0
