"""Weighted k-nearest-neighbour monitor (InstDisc / DINO style): cosine similarity, top-k, weights exp(sim / T).

Cheap enough to run every few epochs during pre-training (`train.knn_every_epochs`) and as `supcon-scale knn`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import arguments, distributed
from supcon_scale.config import ModelConfig
from supcon_scale.evaluation.features import default_device, extract_features
from supcon_scale.files import write_text
from supcon_scale.hooks import Hook, StepInfo

Source = str | Path | torch.utils.data.Dataset | tuple[torch.Tensor, torch.Tensor]


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores `[Q, C]`: for each query, the sum of exp(cos / T) over its k most similar train rows per class.

    With a process group every rank scores its own contiguous share of the queries against the whole bank and the
    shares are all-gathered (the [Q, N] similarities were computed in full on every rank). On the GPU the neighbours
    are chosen from bf16 similarities (tensor cores; ImageNet's 1.28M x 50k is ~1.6e16 multiply-adds) and their
    weights recomputed in fp32 from the chosen rows, so only near-ties between neighbours can differ from fp32.
    """
    if k < 1:
        raise ValueError(f"knn.k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"knn.temperature must be > 0, got {temperature}")
    bank = F.normalize(train_features.float(), dim=1)
    fast = bank.to(torch.bfloat16) if bank.device.type == "cuda" else bank
    k = min(k, bank.shape[0])
    rank, world = distributed.world()
    sizes = [len(r) for r in torch.arange(query_features.shape[0]).tensor_split(world)]
    start = sum(sizes[:rank])
    mine = F.normalize(query_features[start : start + sizes[rank]].float(), dim=1)
    out = [torch.zeros(0, num_classes, device=bank.device)]
    for q in mine.split(chunk):  # [chunk, N] at a time, never [Q, N]
        _, idx = (q.to(fast.dtype) @ fast.T).topk(k, dim=1)
        sim = torch.linalg.vecdot(q[:, None, :], bank[idx])  # fp32 cosines of the chosen neighbours
        weights = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
        scores.scatter_add_(1, train_labels[idx], weights)
        out.append(scores)
    return distributed.all_gather_no_grad(torch.cat(out), sizes)


def _features(
    encoder: nn.Module, source: Source, image_size: int | None, batch_size: int, device: torch.device, workers: int
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(features, labels, class names when the source knows them) of a folder, a dataset or cached tensors."""
    if isinstance(source, tuple):
        return source[0].to(device), source[1].to(device), None
    if isinstance(source, (str, Path)):
        from supcon_scale.data.eval import EvalDataset

        if image_size is None:
            raise ValueError("knn: image_size is required when train/val are folders")
        source = EvalDataset(source, "", image_size)
    f, y, _ = extract_features(encoder, source, batch_size=batch_size, device=device, num_workers=workers)
    index = getattr(source, "index", None)
    return f.to(device), y.to(device), list(index.classes) if index is not None else None


def cap_k(k: int, labels: torch.Tensor, classes: list[str] | None, warn: bool = True) -> tuple[int, str | None]:
    """k capped at the smallest class's number of train rows, and that class's name when it capped it.

    With k above a class's size, even a query whose every same-class neighbour is nearest gets at least k - size
    votes from other classes, so the small classes are outvoted (k=200 against the digits' ~144-image classes).
    """
    counts = torch.bincount(labels.cpu(), minlength=len(classes) if classes else 0)
    present = counts[counts > 0]
    smallest = int(present.min())
    if k <= smallest:
        return k, None
    label = int(torch.nonzero(counts == smallest)[0])
    name = classes[label] if classes else str(label)
    if warn and distributed.world()[0] == 0:
        from supcon_scale.console import warn as say

        say(f"knn: k={k} exceeds the {smallest} train images of class {name!r} (the smallest); using k={smallest}")
    return smallest, name


def knn_eval(
    encoder: nn.Module,
    train: Source,
    val: Source,
    *,
    image_size: int | None = None,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    flag: str = "--data",
    warn: bool = True,
) -> dict[str, Any]:
    """{"top1", "top5" (fractions) with their 95% intervals and n, the k used} of a weighted kNN classifier;
    `train`/`val` are split folders (`<class>/<image>`), datasets yielding `(image, label)`, or `(features,
    labels)` tensors. Folders must hold the same class folders (a ValueError naming `flag` otherwise); k is capped
    at the smallest train class (`cap_k`, with a warning when `warn`).

    Feature extraction is sharded over ranks when a process group is up; every rank returns the same numbers.
    """
    from supcon_scale.evaluation.linear import topk_accuracy
    from supcon_scale.evaluation.splits import check_same_classes, class_difference
    from supcon_scale.evaluation.stats import accuracy_interval

    if isinstance(train, (str, Path)) and isinstance(val, (str, Path)):
        check_same_classes(train, val, flag)  # before any image is decoded
    device = default_device(device)
    tx, ty, train_classes = _features(encoder, train, image_size, batch_size, device, num_workers)
    vx, vy, val_classes = _features(encoder, val, image_size, batch_size, device, num_workers)
    if train_classes is not None and val_classes is not None and train_classes != val_classes:
        diff = class_difference("train", train_classes, "val", val_classes)
        raise ValueError(f"{flag}: the classes of the train and val datasets differ ({diff})")
    num_classes = int(max(int(ty.max()), int(vy.max())) + 1)
    used, capped_by = cap_k(k, ty, train_classes, warn)  # the smallest class is never above the train size
    scores = knn_scores(tx, ty, vx, num_classes=num_classes, k=used, temperature=temperature)
    acc = topk_accuracy(scores, vy)
    return {
        **acc,
        "top1_interval_95": accuracy_interval(acc["top1"], len(vy)),
        "top5_interval_95": accuracy_interval(acc["top5"], len(vy)),
        "k": used,
        "k_requested": k,
        "k_capped_by_class": capped_by,
        "temperature": temperature,
        "num_train": len(ty),
        "num_val": len(vy),
    }


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter is a shard (FSDP2's DTensor): such a module cannot run outside its engine's forward."""
    return any(hasattr(p, "full_tensor") for p in module.parameters())


class KnnMonitor(Hook):
    """During pre-training: weighted kNN (k=200 capped at the smallest class, T=0.07) of the encoder on
    `data.root/val` every `every_steps` steps, written to the run's metrics with its 95% interval and n. `encoder`
    is the engine's unwrapped encoder; extraction is sharded over the ranks.

    Under FSDP2 (several ranks) the encoder's parameters are shards, and calling the encoder directly would mix
    DTensor and plain tensors (its stem is in the root's shard) or hang (each stage all-gathers per call, and ranks
    encode different numbers of batches). The monitor then gathers a full copy through the engine's collective
    `state_dict()` and broadcasts it, so every rank encodes its share with a plain module; `engine` and `model` (the
    model section the copy is built from) are required.
    """

    def __init__(
        self,
        encoder: nn.Module,
        root: Path,
        image_size: int,
        every_steps: int,
        metrics: Any,
        engine: Any = None,
        model: ModelConfig | None = None,
    ) -> None:
        if is_sharded(encoder) and (engine is None or model is None):
            raise ValueError(
                "KnnMonitor: the encoder's parameters are sharded (FSDP2); pass engine= and model= to gather a copy"
            )
        check_monitor_data(root)  # at start: a missing val/ would otherwise end the run at the first epoch's end
        self.encoder, self.root, self.image_size, self.every = encoder, Path(root), image_size, every_steps
        self.metrics, self.engine, self.model = metrics, engine, model
        self._copy: nn.Module | None = None
        self._warned = False  # the k cap is said once per run, not every epoch

    def full_encoder(self) -> nn.Module:
        """The encoder to extract with: itself, or under FSDP2 a plain copy of its current weights (collective)."""
        if not is_sharded(self.encoder):
            return self.encoder
        from supcon_scale.checkpoint import encoder_state
        from supcon_scale.models import create_encoder, encoder_kwargs

        model = self.engine.state_dict()["model"]  # every rank calls it; rank 0 receives the full state
        state = distributed.broadcast_object(encoder_state(model) if self.engine.ctx.is_main else None)
        if self._copy is None:
            cfg = self.model
            assert cfg is not None  # checked in __init__ for a sharded encoder
            self._copy = create_encoder(cfg.encoder, cfg.cifar_stem, kwargs=encoder_kwargs(cfg, self.image_size))
        self._copy.load_state_dict(state)
        return self._copy

    def on_step(self, info: StepInfo) -> None:
        if info.step % self.every == 0:
            encoder = self.full_encoder()
            # Loader workers decode (0 would decode in the training process, with the GPU idle meanwhile).
            workers = min(8, len(os.sched_getaffinity(0)))
            result = knn_eval(
                encoder, self.root / "train", self.root / "val", image_size=self.image_size, num_workers=workers,
                flag="data.root", warn=not self._warned,
            )  # fmt: skip
            self._warned = True
            row = {
                "step": info.step, "epoch": info.epoch, "knn_top1": result["top1"], "knn_top5": result["top5"],
                "knn_top1_interval_95": result["top1_interval_95"], "knn_top5_interval_95": result["top5_interval_95"],
                "knn_num_val": result["num_val"], "knn_k": result["k"],
            }  # fmt: skip
            self.metrics.write(row)


def check_monitor_data(root: str | Path) -> None:
    """The kNN monitor's splits, `data.root/train` and `data.root/val` with the same class folders, checked before
    training starts (a one-line ValueError naming data.root and the folder)."""
    from supcon_scale.evaluation.splits import check_splits

    try:
        check_splits(root, "data.root")
    except ValueError as exc:
        raise ValueError(f"{exc} (train.knn_every_epochs reads data.root/train and data.root/val)") from None


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale knn --checkpoint PATH --data DIR [--k 200] [--temperature 0.07] [--json OUT]`."""
    from supcon_scale.evaluation.linear import checkpoint_image_size
    from supcon_scale.export import encoder_from_export

    args = arguments.knn().parse_args(argv)
    from supcon_scale.evaluation.features import check_args

    check_args(args)
    from supcon_scale.evaluation.splits import check_splits

    try:  # before the encoder loads: a missing or mismatched split, named by its flag
        check_splits(args.data, "--data")
    except ValueError as exc:
        print(f"knn: error: {exc}", file=sys.stderr)
        return 2
    ctx = distributed.init()
    try:
        encoder, meta = encoder_from_export(args.checkpoint)
        size = args.image_size or checkpoint_image_size(args.checkpoint, meta.get("cifar_stem") == "1")
        root = Path(args.data)
        result = knn_eval(
            encoder, root / "train", root / "val", image_size=size, k=args.k, temperature=args.temperature,
            batch_size=args.batch_size, device=args.device or ctx.device, num_workers=args.workers,
        )  # fmt: skip
    except ValueError as exc:
        print(f"knn: error: {exc}", file=sys.stderr)
        distributed.teardown()
        return 2
    if ctx.is_main:
        from rich.console import Console

        from supcon_scale.evaluation.stats import format_accuracy

        n, k = result["num_val"], result["k"]
        by = result["k_capped_by_class"]
        asked = "" if k == args.k else f" (capped from {args.k} at " + (f"class {by!r})" if by else "the train size)")
        top1, top5 = format_accuracy(result["top1"], n), format_accuracy(result["top5"], n)
        Console(soft_wrap=True).print(f"kNN (k={k}{asked}, T={args.temperature}): top-1 {top1}  top-5 {top5}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text(args.json, json.dumps({**result, "checkpoint": str(args.checkpoint)}, indent=2))
    distributed.teardown()
    return 0
