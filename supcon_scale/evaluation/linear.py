"""Linear evaluation (the paper's stage 2): a linear classifier on a frozen encoder, scored at the final epoch.

The protocols (`official`, `hobbitlong`, `fast`; docs/EVALUATION.md) and their optimizers and schedules are in
linear_protocols.py, the fit loops in linear_fit.py; this module holds the probe, what the pre-training run says
about its evaluation, `fit_linear_probe` and the `linear-eval` command. With a process group up each rank takes a
slice of every global batch and the head's gradients are summed over ranks. The reported accuracy is the final
epoch's, never the best on the evaluation split.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import arguments, config, distributed
from supcon_scale.data.folder import FolderIndex
from supcon_scale.evaluation.features import (
    cache_key,
    default_device,
    extract_features,
    freeze,
    load_features,
    save_features,
)
from supcon_scale.evaluation.linear_fit import fit_lbfgs, fit_minibatch, fit_stream, stream_batches, stream_transform
from supcon_scale.evaluation.linear_protocols import (
    PRESETS,
    PROTOCOL_NAMES,
    Preset,
    PresetName,
    lr_at,
    make_optimizer,
    resolve_protocol,
)
from supcon_scale.files import write_replacing, write_text

# The protocol names, optimizer and schedule of linear_protocols.py and the stream of linear_fit.py stay importable
# from here, the linear probe's one entry point (the recipes' tables and the tests read them through it).
__all__ = [
    "PRESETS", "PROTOCOL_NAMES", "LinearProbe", "Preset", "PresetName", "checkpoint_image_size", "fit_linear_probe",
    "linear_eval", "load_probe", "lr_at", "main", "make_optimizer", "resolve_protocol", "run_config", "save_probe",
    "stream_batches", "topk_accuracy",
]  # fmt: skip


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
    from supcon_scale.data.folder import index_folder
    from supcon_scale.evaluation.splits import check_splits

    form, cfg = _protocol(preset, stage1, epochs, batch_size, augment)
    device = default_device(device)
    root = Path(data_root)
    check_splits(root, "--data", train_split, val_split)  # both there, the same class folders: else labels shift
    index = {"train": index_folder(root / train_split), "val": index_folder(root / val_split)}
    encoder = freeze(encoder).to(device)
    data_cfg = stage1.data if stage1 is not None else config.DataConfig()
    view = {"mean": data_cfg.augment.mean, "std": data_cfg.augment.std, "crop": data_cfg.eval_crop}
    normalize = cfg.stream == "stage1" and stage1 is not None and stage1.model.normalize_encoder_output
    # the stream encodes the train images at every step: their features only serve the standardisation
    splits = ("train", "val") if cfg.stream == "cached" or cfg.standardize else ("val",)
    feats, timing = _features(encoder, root, {s: index[s] for s in splits}, image_size, view, cfg.batch_size,
                              device, num_workers, cache_dir)  # fmt: skip
    mean, std = _standardisation(cfg, feats, device)
    start = time.perf_counter()
    fc, info, lr_value = _train_head(
        cfg, encoder, feats, index["train"], mean, std, lr, image_size, stage1, seed, device, num_workers, normalize
    )
    timing["train_s"] = time.perf_counter() - start
    probe = LinearProbe(encoder, fc, mean, std, index["train"].classes, normalize=normalize).to(device)
    result = {
        "preset": preset, "protocol": form, "epochs": info.pop("epochs"), "augment": cfg.stream != "cached",
        "stream": cfg.stream, "batch_norm": cfg.bn, "normalize_features": normalize, "optimizer": cfg.optimizer,
        "lr": lr_value, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing, "stage1_config": stage1 is not None, "eval_crop": view["crop"],
        "num_train": len(index["train"]), "num_val": len(index["val"]), "num_classes": len(index["train"].classes),
        "image_size": image_size, "world_size": distributed.world()[1], "device": str(device), **info, **timing,
    }  # fmt: skip
    return probe, {**_scores(probe, feats, device, keep_predictions), **result}


def _protocol(
    preset: str, stage1: config.RunConfig | None, epochs: int | None, batch_size: int | None, augment: bool
) -> tuple[str, Preset]:
    """The protocol's name and preset with the caller's epochs, batch size and `--augment` applied."""
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
    return form, cfg


def _features(
    encoder: nn.Module, root: Path, indexes: dict[str, FolderIndex], image_size: int, view: dict[str, Any],
    batch_size: int, device: torch.device, num_workers: int, cache_dir: str | Path | None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:  # fmt: skip
    """Each split's (features, labels) of the frozen encoder, read back from `cache_dir` when its key matches."""
    from supcon_scale.data.eval import EvalDataset

    timing: dict[str, float] = {}
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, index in indexes.items():
        key = cache_key(encoder, index.paths, image_size) + json.dumps(view, default=list)
        cached = load_features(Path(cache_dir) / f"features_{split}.safetensors", key) if cache_dir else None
        if cached is None:
            dataset = EvalDataset(root, "", image_size, index=index, **view)
            f, y, t = extract_features(
                encoder, dataset, batch_size=min(batch_size, 1024), device=device, num_workers=num_workers
            )
            timing[f"extract_{split}_s"] = t["seconds"]
            timing[f"extract_{split}_images_per_s"] = t["images_per_s"]
            if cache_dir and distributed.world()[0] == 0:
                save_features(Path(cache_dir) / f"features_{split}.safetensors", f, y, key)
            cached = (f, y)
        feats[split] = cached
    return feats, timing


def _standardisation(
    cfg: Preset, feats: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input mean and std: the train features' (`fast`), else 0 and 1."""
    dim = feats["val"][0].shape[1]
    if not cfg.standardize:
        return torch.zeros(dim, device=device), torch.ones(dim, device=device)
    tx = feats["train"][0].to(device)
    return tx.mean(0), tx.std(0).clamp_min(1e-6)


def _train_head(
    cfg: Preset, encoder: nn.Module, feats: dict[str, tuple[torch.Tensor, torch.Tensor]], train_index: FolderIndex,
    mean: torch.Tensor, std: torch.Tensor, lr: float | None, image_size: int, stage1: config.RunConfig | None,
    seed: int, device: torch.device, num_workers: int, normalize: bool,
) -> tuple[nn.Linear, dict[str, Any], float]:  # fmt: skip
    """The head by the protocol's fit loop: (head, what the loop reports, the learning rate it used)."""
    num_classes, dim = len(train_index.classes), feats["val"][0].shape[1]
    lr_value = lr if lr is not None else cfg.base_lr * (cfg.batch_size / 256 if cfg.scale_lr else 1.0)
    if cfg.stream != "cached":
        transform = stream_transform(cfg, stage1, image_size)
        global_bn = stage1 is not None and stage1.model.sync_bn
        fc, info = fit_stream(
            cfg, encoder, train_index, transform, num_classes, dim, cfg.epochs, cfg.batch_size, lr_value, seed,
            device, num_workers, normalize, global_bn,
        )  # fmt: skip
        return fc, info, lr_value
    x, y = feats["train"][0].to(device), feats["train"][1].to(device)
    x = (x - mean) / std
    if cfg.optimizer == "lbfgs":
        fc, info = fit_lbfgs(x, y, num_classes, cfg.epochs, seed)
        return fc, info, 1.0
    fc, info = fit_minibatch(cfg, x, y, num_classes, cfg.epochs, cfg.batch_size, lr_value, seed)
    return fc, info, lr_value


def _scores(
    probe: LinearProbe, feats: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device, keep: bool
) -> dict[str, Any]:
    """Top-1/top-5 on val (the final head's), the count right, the train top-1 when its features are at hand."""
    val_x, val_y = (t.to(device) for t in feats["val"])
    with torch.no_grad():
        val_logits = probe.head(val_x)
        val_acc = topk_accuracy(val_logits, val_y)
        train = feats.get("train")
        train_acc = topk_accuracy(probe.head(train[0].to(device)), train[1].to(device)) if train else {}
    scores = {**val_acc, "correct": round(val_acc["top1"] * len(val_y)), "train_top1": train_acc.get("top1")}
    scores["feature_dim"] = val_x.shape[1]
    if keep:
        scores["val_correct"] = (val_logits.argmax(1) == val_y).tolist()
    return scores


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
