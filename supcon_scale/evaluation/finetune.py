"""Fine-tuning transfer (the paper's section 4.4 protocol family): the whole encoder trains with a new linear head.

Unlike linear evaluation nothing is frozen: batch norm updates its statistics and every encoder weight gets the
gradient of the new head's cross-entropy. The recipe is momentum SGD (Nesterov by default) with a cosine decay on
crop 0.08-1 + flip views, as the transfer protocol the paper follows (Kornblith et al. 2019) trains; that protocol
grid-searches LR and weight decay per dataset, so both are flags here and no value is claimed to be the paper's.
One process; the accuracy reported is the final epoch's on the evaluation split, with its n and 95% interval.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import arguments, config, distributed
from supcon_scale.files import write_text


class Finetuned(nn.Module):
    """Encoder -> linear head over `classes`; both train."""

    def __init__(self, encoder: nn.Module, num_classes: int, normalize: bool = False):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(int(encoder.num_features), num_classes)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.fc(F.normalize(h, dim=-1) if self.normalize else h)


def finetune(
    encoder: nn.Module,
    data_root: str | Path,
    *,
    image_size: int,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    seed: int = 0,
    stage1: config.RunConfig | None = None,
) -> tuple[Finetuned, dict[str, Any]]:
    """Train `encoder` + a new head on `data_root/train`; top-1/top-5 on `data_root/val` after the last epoch."""
    from torchvision.transforms import v2

    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.data.folder import index_folder
    from supcon_scale.evaluation.features import default_device, extract_features
    from supcon_scale.evaluation.linear import _AugmentedFolder, topk_accuracy
    from supcon_scale.evaluation.splits import check_splits

    if distributed.world()[1] > 1:
        raise ValueError("finetune runs in one process; launch it without torchrun")
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"--epochs, --batch-size and --lr must be positive: {epochs}, {batch_size}, {lr}")
    root = Path(data_root)
    check_splits(root, "--data")  # both there, the same class folders: else every label after a difference shifts
    train_index, val_index = index_folder(root / "train"), index_folder(root / "val")
    data_cfg = stage1.data if stage1 is not None else config.DataConfig()
    mean, std = list(data_cfg.augment.mean), list(data_cfg.augment.std)
    device = default_device(device)
    torch.manual_seed(seed)
    normalize = stage1 is not None and stage1.model.normalize_encoder_output
    model = Finetuned(encoder, len(train_index.classes), normalize).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    crop = v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    transform = v2.Compose([v2.PILToTensor(), crop, v2.RandomHorizontalFlip(), *to_float])
    dataset = _AugmentedFolder(train_index, transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=nesterov)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    start = time.perf_counter()
    loss_sum = 0.0
    for _ in range(epochs):
        model.train()
        loss_sum = 0.0
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
    train_s = time.perf_counter() - start
    model.eval()
    val = EvalDataset(root, "val", image_size, index=val_index, mean=mean, std=std, crop=data_cfg.eval_crop)
    logits, y, _ = extract_features(model, val, batch_size=256, device=device, num_workers=num_workers)
    acc = topk_accuracy(logits, y)
    from supcon_scale.evaluation.stats import accuracy_interval

    result = {
        **acc,
        "interval_95": accuracy_interval(acc["top1"], len(val_index)),
        "protocol": "finetune",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "final_train_loss": loss_sum / max(len(loader), 1),
        "num_train": len(train_index),
        "num_val": len(val_index),
        "num_classes": len(train_index.classes),
        "image_size": image_size,
        "eval_crop": data_cfg.eval_crop,
        "train_s": train_s,
    }
    return model, result


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale finetune`: exit 0, or 2 with a one-line reason on bad input."""
    from supcon_scale.evaluation.features import check_args
    from supcon_scale.evaluation.linear import checkpoint_image_size, run_config
    from supcon_scale.evaluation.stats import format_accuracy
    from supcon_scale.export import encoder_from_export, export_encoder

    args = arguments.finetune().parse_args(argv)
    try:
        check_args(args)
        encoder, meta = encoder_from_export(args.checkpoint)
        size = args.image_size or checkpoint_image_size(args.checkpoint, meta.get("cifar_stem") == "1")
        model, result = finetune(
            encoder, args.data, image_size=size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, nesterov=not args.no_nesterov, device=args.device,
            num_workers=args.workers, seed=args.seed, stage1=run_config(args.checkpoint),
        )  # fmt: skip
    except ValueError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    result.update(checkpoint=str(args.checkpoint), encoder=meta.get("encoder"))
    print(f"fine-tuned {meta.get('encoder')}: top-1 {format_accuracy(result['top1'], result['num_val'])}, "
          f"top-5 {100 * result['top5']:.2f} after {args.epochs} epochs")  # fmt: skip
    if args.save:
        export_encoder(model.encoder, args.save, meta)  # the same construction arguments
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
